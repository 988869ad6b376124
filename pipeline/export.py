"""Export a run's samples in another layout.

`controlnet-train`: the three columns diffusers' `examples/controlnet/train_controlnet.py` reads
by default, in its default order: `image` (the target image), `conditioning_image` (a control
map) and `text` (its caption). From a generation run the target is the generated image and the
text its prompt, so each pair is exactly what the ControlNet was asked to do; from an
annotate-only run the target is the source image and the text its caption. The files are
Parquet with `datasets` Image features, one per samples file, in `DEST/train/`, so
`load_dataset(DEST)` and `train_controlnet.py --train_data_dir DEST` read them.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.output import RunOutput, write_parquet
from pipeline.schema import IMAGE

TRAIN_SCHEMA = pa.schema([("image", IMAGE), ("conditioning_image", IMAGE), ("text", pa.string())]).with_metadata(
    {"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "conditioning_image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}}})}
)


class ExportError(ValueError):
    """The output cannot be exported as asked (no samples, unknown control map, destination in use)."""


def empty_text_message(empty: int, text: str) -> str:
    """What to do about rows without text (one line)."""
    return (f"{empty} rows have an empty {text} (text), so they cannot teach the prompt; add captions: a "
            f"`captioner` section in the job config (e.g. kind: blip, model: Salesforce/blip-image-captioning-base; "
            f"or kind: florence2) writes them for uncaptioned images, or give the source captions "
            f"(caption_column, .txt members), then run the job again with output.new_version=true (either change "
            f"makes it another job, written next to this output)")


def export_controlnet_train(src: str, dest: str, control: str | None = None, target: str | None = None,
                            overwrite: bool = False, storage_options: dict[str, Any] | None = None,
                            require_text: bool = False) -> dict[str, Any]:
    """Write `src`'s samples as (image, conditioning_image, text) rows under `dest`; returns what was done,
    with `empty_text`, the number of rows whose text is empty, and `source_completed`, whether the run had ended.
    `require_text`: refuse (ExportError, nothing written) if any row's text is empty."""
    out = RunOutput(src, storage_options)
    manifest = out.manifest()
    columns = out.samples_schema().names
    if not columns:
        raise ExportError(f"{src} has no samples to export")
    controls = [c.removeprefix("control_") for c in out.control_columns()]
    if control is None:
        if len(controls) != 1:
            raise ExportError(f"{src} has control maps {controls}: choose one with --control ID")
        control = controls[0]
    if control not in controls:
        raise ExportError(f"{src} has no control map {control!r}; it has {controls}")
    target = target or ("generated" if "generated" in columns else "image")
    if target not in ("generated", "image") or target not in columns:
        raise ExportError(f"--image {target!r}: {src} has {[c for c in ('generated', 'image') if c in columns]}")
    text = "prompt" if target == "generated" else "caption"
    sources = out.files("samples")
    kept, empty = _rows_kept(out, sources, target, text)
    if empty and require_text:
        raise ExportError(empty_text_message(empty, text))

    export = RunOutput(dest, storage_options)
    if (blocking := export.file_in_the_way()) is not None:
        raise ExportError(f"{dest}: {blocking} is a file, not a directory")
    same_fs = type(export.fs) is type(out.fs)
    if same_fs and (export.root + "/").startswith(out.root.rstrip("/") + "/"):
        raise ExportError(f"{dest} is inside the output {src}: export to a directory of its own")
    for name in EXPORT_NAMES:  # e.g. the run copied to DEST/train: --overwrite would delete the run it reads
        if same_fs and (out.root + "/").startswith(export.path(name).rstrip("/") + "/"):
            raise ExportError(f"the output {src} is inside {export.path(name)}, which an export replaces: export to "
                              f"another directory")
    held = [name for name in EXPORT_NAMES if export.exists(name)]
    if held and not overwrite:  # an earlier export, or a user's own files of those names
        raise ExportError(f"{dest} already holds {', '.join(held)} (an export writes these); choose another path or "
                          f"pass --overwrite")
    for name in held:
        export.fs.rm(export.path(name), recursive=True)
    export.fs.makedirs(export.path("train"), exist_ok=True)
    files, rows = [], 0
    for i, (path, keep) in enumerate(zip(sources, kept)):
        table = out.read_file(path, [target, f"control_{control}", text])
        table = table if keep is None else table.filter(keep)
        if not table.num_rows:  # every row a variant of a source exported from an earlier file
            continue
        captions = pc.fill_null(table.column(text), "")
        train = pa.Table.from_arrays([table.column(target), table.column(f"control_{control}"), captions], schema=TRAIN_SCHEMA)
        name = f"train/part-{i:05d}.parquet"
        write_parquet(export.fs, export.path(name), train)
        files.append(name)
        rows += train.num_rows
    record = {"format": "controlnet-train", "source": src, "source_run_id": manifest.get("run_id"),
              "source_completed": bool(manifest.get("completed")),
              "image": target, "conditioning_image": f"control_{control}", "text": text, "rows": rows, "files": files,
              "empty_text": empty}
    export.write_json("export.json", record)
    # the card tells `load_dataset(dest)` which files are data, and its config's description what they hold: the
    # library keys its cache by the folder's name and the card's configs, not the files, so a second export of
    # other pairs into a folder of the same name was read from the first one's cache (see docs.card)
    description = (f"pairs from run {manifest.get('run_id')} (job {manifest.get('job_fingerprint')}): image {target}, "
                   f"conditioning_image control_{control}, text {text}; run files {out.digest()}")
    export.write_text("README.md", CARD.format(source=src, run_id=manifest.get("run_id"), target=target, control=control,
                                               text=text, description=json.dumps(description)))
    return record


def _rows_kept(out: RunOutput, files: list[str], target: str, text: str) -> tuple[list[pa.Array | None], int]:
    """Which rows of each part file the export writes (None: all), and how many of those have an empty `text`.
    Pairs of source images keep one row per source: a run's variants of a source repeat its image, control map
    and caption, and each copy would weigh that pair once more in training."""
    seen: set[str] = set()
    kept, empty = [], 0
    for path in files:
        table = out.read_file(path, [text, "source_sha256"] if target == "image" else [text])
        keep = None
        if target == "image":
            keep = pa.array([not (sha in seen or seen.add(sha)) for sha in table.column("source_sha256").to_pylist()])
            table = table.filter(keep)
        kept.append(keep)
        empty += pc.sum(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(table.column(text), "")), "")).as_py() or 0
    return kept, empty


EXPORT_NAMES = ("train", "export.json", "README.md")  # what an export writes in its directory
CARD = """---
configs:
- config_name: default
  description: {description}
  data_files:
  - split: train
    path: train/*.parquet
tags: [controlnet]
---

# ControlNet training pairs

Exported from `{source}` (run `{run_id}`) by `python -m pipeline export --format controlnet-train`:
`image` is the run's `{target}` column, `conditioning_image` its `control_{control}` and `text` its
`{text}`. Train with diffusers' `examples/controlnet/train_controlnet.py --train_data_dir THIS_DIR`.
"""
