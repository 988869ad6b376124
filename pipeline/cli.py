"""Command line: `python -m pipeline run CONFIG.yaml [--set k=v ...]` and friends."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from pipeline.cluster import RayUnavailable, init_ray, joins_cluster, stops_ray
from pipeline.config import ConfigError, load_config


@stops_ray
def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.cpus import loading

    with loading():  # the driver's start, as an actor's: see init_ray
        try:
            cfg = load_config(args.config, args.set)  # config errors before anything heavy is imported
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from pipeline.io.lock import OutputLocked
        from pipeline.io.output import UnsafeParquet
        from pipeline.io.sources import SourceError
        from pipeline.job import OutputExists, execute, finished, prepare, resolve_models
        from pipeline.models import ModelUnavailable

    say = (lambda line: None) if args.quiet else print
    plan = None
    try:
        models = resolve_models(cfg)  # fail fast, before a cluster is started or joined
        plan = prepare(cfg, models, retry_errors=args.retry_errors)  # source and output checked, output locked
        if plan.complete:
            finished(plan, say)  # says so; nothing is written
            return 0
        with loading():
            init_ray(args.address, args.verbose)
        result = execute(plan, say, bar=not args.quiet)
    except (ModelUnavailable, OutputExists, OutputLocked, SourceError, UnsafeParquet, RayUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was written is kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - e.g. a model that cannot load in its actor: one readable line
        if args.verbose:  # the stack trace too (Ray Data's log line before it promises one)
            traceback.print_exception(e)
        print(f"error: the run stopped: {failure_reason(e)}; what was written is kept, and running the same "
              f"command again resumes it", file=sys.stderr)
        return 1
    finally:
        if plan is not None:
            plan.lock.release()
    print(result.summary())
    if not args.quiet:
        print_tables(result)
    return 0


def print_tables(result) -> None:
    """The stages' time shares and throughputs, and the output's errors by reason."""
    from pipeline.console import error_lines, stage_table
    from pipeline.docs.stats import error_groups
    from pipeline.io.output import RunOutput

    print("stages (time measured in each stage; they overlap):")
    print("\n".join(stage_table(result.manifest)))
    groups = error_groups(RunOutput(result.output, result.manifest["config"]["output"].get("storage_options") or {}))
    if groups:
        print("errors by reason:")
        print("\n".join(error_lines(groups)))


def cmd_plan(args: argparse.Namespace) -> int:
    """What a run would do, without running it (no Ray)."""
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.io.lock import OutputLocked
    from pipeline.io.sources import SourceError
    from pipeline.job import OutputExists, model_roles, prepare, resolve_models
    from pipeline.models import ModelUnavailable

    try:
        models = resolve_models(cfg)
        plan = prepare(cfg, models, dry_run=True, retry_errors=args.retry_errors)  # nothing locked, deleted or created
    except (ModelUnavailable, OutputExists, OutputLocked, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, variants = plan.cfg, cfg.generation.variants_per_image if cfg.generation else 1
    listed, limit = len(plan.listing.uris), cfg.source.limit
    what = {"images": "image files", "parquet": "Parquet files", "webdataset": "tar shards"}[cfg.source.type]
    found = listed if plan.rows is None else plan.rows  # the inputs, where the source says before reading
    if plan.rows is not None:
        what += f" ({plan.rows} rows)"
    inputs = None if cfg.source.type == "webdataset" else min(found, limit or found)
    print(f"source: {cfg.source.path}: {listed} {what}"
          + (f", {inputs} read (source.limit)" if inputs is not None and inputs != found else "")
          + (f"; {plan.listing.skipped} entries that are not regular files skipped" if plan.listing.skipped else ""))
    overwrite = cfg.output.overwrite and not plan.target.resuming and plan.target.path == cfg.output.path
    print(f"output: {cfg.output.path}: " + ("complete: nothing to do" if plan.complete else
                                            "resume" if plan.target.resuming else
                                            "replaces what is there (output.overwrite)" if overwrite else "new"))
    written = plan.target.written
    if plan.target.resuming:
        print(f"  a resume skips {len(written.done_samples)} written samples and {len(written.done_sources)} "
              f"rejected inputs")
    todo = 0 if plan.complete else None if inputs is None else plan.remaining(inputs)
    if todo is not None:
        print(f"to do: {todo} inputs -> {todo * variants} {'samples' if cfg.generation else 'rows'} "
              f"({variants} per input)")
    else:  # a tar shard's samples are counted by reading it
        print(f"to do: every sample{' not yet written' if plan.target.resuming else ''} in the {listed} {what}"
              + (f", at most {limit} in all (source.limit)" if limit else "") + f" ({variants} per sample)")
    print("models:")
    for role, model in model_roles(cfg, models):
        print(f"  {role}: " + (f"{model.model} @ {model.commit}" if model else "(no weights)"))
    if cfg.generation and args.seconds_per_image and todo is not None:
        seconds = todo * variants * args.seconds_per_image / max(cfg.generation.actors, 1)
        print(f"estimate: {seconds / 3600:.2f} GPU-hours on {cfg.generation.actors} actor(s) at "
              f"{args.seconds_per_image:g} s per image")
    return 0


@stops_ray
def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train.config import load_train_config

    try:
        cfg = load_train_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.models import ModelUnavailable
    from pipeline.train import NotEnoughResources, TrainDataError, TrainOutputExists, run_training

    try:
        init_ray(args.address, args.verbose)
        run_training(cfg, cluster_grows=joins_cluster(args.address))
    except (ModelUnavailable, NotEnoughResources, TrainDataError, TrainOutputExists, RayUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the checkpoints are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one readable line; the checkpoints are kept
        print(f"error: training stopped: {failure_reason(e)}; the checkpoints are kept, and running the same "
              f"command again resumes from the last one", file=sys.stderr)
        return 1
    return 0


def failure_reason(e: BaseException) -> str:
    """The root cause of a failed run in one line (Ray errors carry the remote traceback as text)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Ray colours its process names
    lines = [line.strip() for line in text.splitlines()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*:", line)
              and not line.startswith("ray.exceptions.UserCodeException")]  # Ray Data's wrapper of the stage's error
    reason = (causes[-1] if causes else (lines[0] if lines else type(e).__name__)).rstrip(".")  # a clause of a line
    where = re.search(r"ray::(\S+)", text)
    if where is None:
        return reason
    # a Ray Data worker is named by its stages, "MapWorker(MapBatches(annotate:canny)->MapBatches(annotate:hed))":
    # the last is the one whose actor (or task) failed; other processes go by their own name
    stages = re.findall(r"MapBatches\(([^()]+)\)", where.group(1))
    return f"stage {stages[-1]} failed: {reason}" if stages else f"{where.group(1)} failed: {reason}"


def _not_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from pipeline.testing import make_tiny

    annotators = None if args.annotators is None else args.annotators.split(",")
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        print(f"error: {args.dir} is a file, not a directory", file=sys.stderr)
        return 2
    try:
        paths = make_tiny(args.dir, conditions=args.conditions.split(","), seed=args.seed, annotators=annotators,
                          families=args.families.split(","),
                          captioners=[c for c in args.captioners.split(",") if c] if args.captioners != "all" else "all")
    except ValueError as e:  # an unknown annotator, family or captioner: named before anything is written
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_annotators(args: argparse.Namespace) -> int:
    from pipeline.annotators import ANNOTATORS

    for name, cls in ANNOTATORS.items():
        weights = (f"weights: {cls.default_model} ({', '.join(cls.files)})" if cls.default_model else "no weights")
        print(f"{name}: {cls.description} [{weights}]")
        if not cls.Params.model_fields:
            print("    (no parameters)")
        for field, info in cls.Params.model_fields.items():
            kind = getattr(info.annotation, "__name__", str(info.annotation))
            doc = f" - {info.description}" if info.description else ""
            print(f"    {field}: {kind} = {info.default!r}{doc}")
        if cls.keypoints:
            print("    adds column keypoints_<id> (OpenPose JSON)")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from pipeline.fetch import fetch
    from pipeline.models import ModelUnavailable

    try:
        fetched = fetch(load_config(args.config, args.set), args.dir)
    except (ConfigError, ModelUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in fetched:
        print(f"{f.role}: {f.model} -> {f.path} ({'downloaded' if f.downloaded else 'local'}: {', '.join(f.files)})")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from pipeline.schema import write_schema_files

    for path in write_schema_files(args.dir):
        print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.docs import write_documents
    from pipeline.io.output import NotARunOutput

    try:
        paths = write_documents(args.output, max_sources=args.max_sources)
    except NotARunOutput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.docs import inspect_text
    from pipeline.io.output import NotARunOutput

    try:
        print(inspect_text(args.output))
    except NotARunOutput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.io.lock import OutputLocked
    from pipeline.io.output import NotARunOutput
    from pipeline.models import ModelUnavailable
    from pipeline.scorers.rescore import NotScorable, score_output

    try:
        score_output(args.output, args.set)
    except (ConfigError, ModelUnavailable, NotARunOutput, NotScorable, OutputLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import ExportError, export_controlnet_train
    from pipeline.io.output import NotARunOutput

    try:
        record = export_controlnet_train(args.output, args.dest, control=args.control, target=args.image,
                                         overwrite=args.overwrite, require_text=args.require_text)
    except (ExportError, NotARunOutput) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not record["source_completed"]:
        print(f"warning: {UNFINISHED.format(path=args.output)}: the export holds the samples it had written",
              file=sys.stderr)
    if record["empty_text"]:
        from pipeline.export import empty_text_message

        print(f"warning: {empty_text_message(record['empty_text'], record['text'])} "
              f"(--require-text makes this an error)", file=sys.stderr)
    print(f"{record['rows']} rows ({record['image']}, {record['conditioning_image']}, {record['text']}) "
          f"in {len(record['files'])} files -> {args.dest}")
    return 0


UNFINISHED = "{path} is a run that has not completed (still running, or stopped; its command run again resumes it)"
SET_HELP = ("override a config key (repeatable): KEY=VALUE sets it (YAML, or text where the schema wants text), "
            "KEY+=VALUE appends to a list")


def prog_name() -> str:
    """`controlnet-pipeline` when run as the console script, else `python -m pipeline`."""
    return "python -m pipeline" if sys.argv[0].endswith("__main__.py") or sys.argv[0] == "-m" \
        else os.path.basename(sys.argv[0]) or "controlnet-pipeline"


def main(argv: list[str] | None = None) -> int:
    from pipeline import __version__

    parser = argparse.ArgumentParser(prog=prog_name(), description="ControlNet dataset pipeline on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a job config")
    p.add_argument("config", help="job config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a Ray instance already running on "
                                     "this machine, else a new local one; 'local' always starts a new one)")
    p.add_argument("--retry-errors", action="store_true",
                   help="do the inputs and samples of an earlier run's error rows again (their rows are removed)")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs and progress bars")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="print only the summary line (with its count of errors) and what stops the run")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("train", help="train a ControlNet on run outputs or exports with Ray Train")
    p.add_argument("config", help="training config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--address", help="Ray cluster address (as for run)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("plan", help="what a run would do: inputs, samples, models and revisions, what a resume skips")
    p.add_argument("config", help="job config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--seconds-per-image", type=float, help="measured seconds per generated image on one actor: "
                                                           "prints an estimate of the generation time")
    p.add_argument("--retry-errors", action="store_true", help="as `run --retry-errors` would: error rows done again")
    p.set_defaults(fn=cmd_plan)

    models = sub.add_parser("models", help="model utilities").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("make-tiny", help="write tiny random-weight models for offline runs and tests")
    p.add_argument("dir")
    p.add_argument("--conditions", default="canny,hed", help="comma-separated ControlNet conditions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--annotators", help="comma-separated annotators whose weights to write, or 'all' "
                                        "(default: every neural annotator except the heavy ones)")
    p.add_argument("--families", default="all", help="comma-separated generator families whose models to write "
                                                     "(sd15, sdxl, sdxl_union, flux, sd3) or 'all' (the default)")
    p.add_argument("--captioners", default="blip,florence2", help="comma-separated captioners whose tiny models to "
                                                                  "write (blip, florence2; the default both), or ''")
    p.set_defaults(fn=cmd_make_tiny)

    p = models.add_parser("fetch", help="download every model file a job config needs into DIR/<repo id>/")
    p.add_argument("config", help="job config YAML")
    p.add_argument("--dir", required=True, help="local directory; configs can then name DIR/<repo id>")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.set_defaults(fn=cmd_fetch)

    p = sub.add_parser("annotators", help="list the annotators, their parameters and weights")
    p.set_defaults(fn=cmd_annotators)

    p = sub.add_parser("schemas", help="write the job-config and output schemas")
    p.add_argument("dir", nargs="?", default="schemas")
    p.set_defaults(fn=cmd_schemas)

    p = sub.add_parser("report", help="(re)write report.html, README.md and croissant.json of a run's output")
    p.add_argument("output", help="the run's output.path (local path or fsspec URL)")
    p.add_argument("--max-sources", type=_not_negative, default=200, help="sources shown in the gallery (default 200)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("inspect", help="print a run's counts, errors, throughput and models")
    p.add_argument("output", help="the run's output.path (local path or fsspec URL)")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("score", help="score a run's samples (quality gate) in place, without generating anything")
    p.add_argument("output", help="the run's output.path (local path or fsspec URL)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set or override a key of the quality section, e.g. quality.min.canny=0.3 (repeatable)")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("export", help="write a run's samples in another layout")
    p.add_argument("output", help="the run's output.path")
    p.add_argument("dest", help="where to write the export (local path or fsspec URL)")
    p.add_argument("--format", required=True, choices=["controlnet-train"],
                   help="controlnet-train: image, conditioning_image, text (diffusers' train_controlnet.py)")
    p.add_argument("--control", help="annotator id of the conditioning image (needed when the run has several)")
    p.add_argument("--image", choices=["generated", "image"],
                   help="target image column (default: generated if the run generated images, else image)")
    p.add_argument("--overwrite", action="store_true", help="replace what an export writes in DEST "
                                                                "(train/, export.json, README.md)")
    p.add_argument("--require-text", action="store_true", help="fail (exit 2, nothing written) if any row's text "
                                                                "is empty, instead of warning")
    p.set_defaults(fn=cmd_export)

    args = parser.parse_args(argv)
    return args.fn(args)


def interrupt(signum: int, frame) -> None:
    """Ctrl-C: KeyboardInterrupt, as Python's own handler raises, except where it would land in the import system's
    own code. There it can fall between importlib taking its global import lock and the `try` that releases it,
    inside a weakref callback whose exceptions Python drops: the Ctrl-C was lost, the run went on, and the lock stayed
    held, so that every other thread's import waited forever (a run's gallery thumbnails, decoded on threads, hung
    at PIL's first import). There the interrupt is sent again a moment later, until it lands outside: as a signal
    to the main thread, which ends a wait it is blocked in (`_thread.interrupt_main` only marks the interrupt
    pending, raised when that wait has returned)."""
    if frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        import signal
        import threading

        threading.Timer(0.01, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        return
    raise KeyboardInterrupt


def console() -> None:
    """`python -m pipeline` and the `controlnet-pipeline` script: main(), then a quick exit. A Ray instance
    this process started is stopped, and the interpreter's teardown (torch, Ray's threads: seconds of
    every run) is skipped: everything is written and closed by then."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (`nohup`, `&`)
        signal.signal(signal.SIGINT, interrupt)
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # stdout closed early (`plan CONFIG | head`): no traceback; the shell's code for SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered goes nowhere
        code = 141
    except KeyboardInterrupt:  # outside a command's own handler: e.g. while Ray stops after a run that finished
        print("interrupted", file=sys.stderr)
        code = 130
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code or 0)
