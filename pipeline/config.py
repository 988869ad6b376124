"""Job configuration: a YAML file validated by pydantic.

Unknown keys and wrong types are rejected with the key path in the message; `--set a.b=c`
overrides any key. `load_config` is the one entry point.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.overrides import (
    ConfigError,
    apply_override,
    error_lines,
    format_errors,
    load_yaml,
    yes_no_number,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
SCHEDULERS = ("unipc", "dpmpp_2m", "ddim", "euler_a", "flow_match_euler")  # the last: flux and sd3 only
MODES = ("text2img", "img2img", "inpaint")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_numbers(cls, value: Any, info) -> Any:
        """YAML reads yes/no/true/false as booleans, which pydantic takes as 1 and 0 where a number goes
        (`steps: yes` was one step), also in a mapping or list of numbers (`quality.min.canny: yes`)."""
        if (given := yes_no_number(value, cls.model_fields[info.field_name].annotation)) is not None:
            raise ValueError(f"{given} is a yes/no value, not a number")
        return value


class SourceConfig(Strict):
    """Where the photos come from: a directory, a glob, Parquet files, or WebDataset tar shards."""

    type: Literal["images", "parquet", "webdataset"] = "images"
    path: str | list[str] = Field(description="Directory, glob or file(s); local path or fsspec URL (s3://…).")
    image_column: str = Field("image", description="Parquet: column with image bytes, a path, or an {bytes, path} struct.")
    caption_column: str | None = Field(None, description="Parquet: optional caption column.")
    prompt_column: str | None = Field(None, description="Parquet: optional column with a prompt per image; it fills "
                                                        "{prompt} for that image's variants (a row without one is "
                                                        "an error row).")
    mask_column: str | None = Field(None, description="Parquet: optional column of inpaint masks (image bytes or "
                                                      "{bytes, path} structs with bytes; white = repainted) aligned "
                                                      "with the upright image; used by generation.mask.source.")
    allowed_roots: list[str] = Field([], description="Parquet: paths in the image column must lie under one of these "
                                                     "directories or URL prefixes (default: the Parquet file's own "
                                                     "directory); others become error rows.")
    caption_key: str = Field("caption", description="WebDataset: key in a sample's .json holding the caption "
                                                    "(used when the sample has no .txt).")
    extensions: list[str] = Field(list(IMAGE_EXTENSIONS), description="Images: file extensions to read; "
                                                                      "WebDataset: sample members that are images.")
    storage_options: dict[str, Any] = Field({}, description="fsspec storage options, e.g. for s3fs: endpoint_url, key, "
                                                            "secret. Without them, the AWS_* environment variables apply.")
    limit: int | None = Field(None, gt=0, description="Read at most this many inputs.")

    @field_validator("path")
    @classmethod
    def _not_empty(cls, path: str | list[str]) -> str | list[str]:
        """An empty path was the current directory: a run read whatever files it held."""
        if not path or any(not p.strip() for p in ([path] if isinstance(path, str) else path)):
            raise ValueError("an empty path; give the directory, glob or file(s) to read")
        return path

    @field_validator("extensions")
    @classmethod
    def _decodable(cls, extensions: list[str]) -> list[str]:
        """Every extension one that decode opens: the files of another (gif, heic) were listed, and each one became
        an error row."""
        for e in extensions:
            if e.lower().lstrip(".") not in IMAGE_EXTENSIONS:
                raise ValueError(f"{e!r} is not an image format the pipeline decodes ({', '.join(IMAGE_EXTENSIONS)})")
        return extensions

    @model_validator(mode="after")
    def _keys_of_its_type(self) -> SourceConfig:
        """A key of another source type is refused, not ignored (`caption_column` on an image folder read no
        captions and said nothing). By value, not by the keys given: a run's manifest holds every key."""
        if self.prompt_column and self.type != "parquet":
            raise ValueError("prompt_column: only a parquet source has columns; use generation.prompt.file for "
                             f"a {self.type} source")
        only = {"image_column": "parquet", "caption_column": "parquet", "mask_column": "parquet",
                "allowed_roots": "parquet", "caption_key": "webdataset"}
        for key in sorted(k for k, kind in only.items() if kind != self.type and getattr(self, k) !=
                          type(self).model_fields[k].default):
            what = "has columns" if key.endswith("_column") else f"reads {key}"
            raise ValueError(f"{key}: only a {only[key]} source {what} (this one is {self.type})")
        return self

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class ImageConfig(Strict):
    """Size policy applied at decode time."""

    resolution: int = Field(512, ge=64, le=4096, description="Target length of the short side in pixels.")
    multiple_of: int = Field(8, ge=1, description="Both sides are rounded to a multiple of this.")
    max_pixels: int = Field(64_000_000, gt=0, description="Inputs with more pixels are rejected (decompression bombs).")
    min_side: int = Field(16, ge=1, description="Inputs whose short side is smaller are rejected.")
    max_aspect_ratio: float = Field(
        4.0, ge=1, description="Inputs whose long side exceeds this many times the short side are rejected."
    )
    max_bytes: int = Field(256 * 2**20, gt=0, description="Inputs larger than this many bytes are rejected unread "
                                                          "(default 256 MiB).")


class AnnotatorConfig(Strict):
    """One control condition, computed by a registered annotator."""

    name: str = Field(description="Registered annotator name, e.g. canny, hed.")
    id: str | None = Field(None, description="Column suffix; defaults to the name. Needed to run one annotator twice.")
    params: dict[str, Any] = Field({}, description="Annotator parameters, checked against the annotator's own model.")
    model: str | None = Field(None, description="Weights: hub repo id or local directory with the same layout.")
    revision: str | None = None
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor for neural annotators, used when the cluster has GPUs.")
    num_cpus: float = Field(1.0, gt=0)
    actors: int = Field(1, ge=1, description="Maximum actor pool size for neural annotators.")
    batch_size: int = Field(4, ge=1, description="Images per annotator call (small batches reach generation sooner).")

    @property
    def key(self) -> str:
        return self.id or self.name


class ControlNetConfig(Strict):
    condition: str = Field(description="The annotator id whose control map feeds this ControlNet.")
    model: str = Field(description="Hub repo id or local directory of a diffusers ControlNetModel.")
    revision: str | None = None
    conditioning_scale: float = Field(1.0, ge=0)
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(1.0, ge=0, le=1)
    control_mode: int | str | None = Field(
        None, description="Union ControlNets (sdxl_union; flux with a Union checkpoint): the condition type, a number or "
                          "a name of the family's table (openpose, depth, hed, canny, normal, segmentation, ...); "
                          "default: looked up from the condition's annotator name.")

    @field_validator("control_mode", mode="before")
    @classmethod
    def _mode_number(cls, value: Any) -> Any:
        """`--set ...control_mode=3` gives the text '3' (the field also takes names): the number, as in YAML."""
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @model_validator(mode="after")
    def _start_before_end(self) -> ControlNetConfig:
        if self.guidance_start >= self.guidance_end:
            raise ValueError("guidance_start must be smaller than guidance_end")
        return self


class PromptConfig(Strict):
    """Prompts: variant i takes prompts[i % len(prompts)], then the template formats it.

    The template may use {prompt}, {caption} and {variant} and nothing else: no attribute or
    index access, so a template cannot reach anything beyond the row's fields.
    """

    prompts: list[str] = Field(["a photo"], min_length=1)
    template: str = Field("{prompt}", description="Fields {prompt}, {caption}, {variant}; an empty field is dropped "
                                                  "with the text joining it to its neighbour (no dangling separators).")
    negative: str = ""
    file: str | None = Field(None, description="JSONL or CSV file of prompts per image (fields `name` or `sha256`, "
                                               "and `prompt`: a string, or in JSONL a list cycled by variant); it "
                                               "fills {prompt} for the images it names, and an image it does not "
                                               "name is an error row. Read with source.storage_options.")
    key: Literal["name", "sha256"] = Field("name", description="How `file` names images: by file name (the last part "
                                                               "of source_uri) or by the sha256 of the source bytes.")

    @field_validator("template")
    @classmethod
    def _safe_template(cls, template: str) -> str:
        for _, field, spec, conversion in string.Formatter().parse(template):
            if field is None:
                continue
            if field not in PROMPT_FIELDS:
                raise ValueError(f"template field {{{field}}} is not one of {sorted(PROMPT_FIELDS)}")
            if spec or conversion:
                raise ValueError(f"template field {{{field}}} may not carry a format spec or conversion")
        return template

    @property
    def prompts_given(self) -> bool:
        """`prompts` other than the default. By value, not by the keys a file names: a run's manifest holds its
        config with every default written out, and run again it is the same job."""
        return self.prompts != type(self).model_fields["prompts"].default

    def unused_prompts(self, prompt_column: str | None = None) -> str | None:
        """The prompts given (`prompts`, `file` or the source's `prompt_column`) that a template without {prompt}
        would leave unused, named as the config names them; None when the template uses them or none is given."""
        if any(field == "prompt" for _, field, _, _ in string.Formatter().parse(self.template)):
            return None
        given = [name for name, value in (("generation.prompt.prompts", self.prompts_given),
                                          ("generation.prompt.file", self.file), ("source.prompt_column", prompt_column))
                 if value]
        return " and ".join(given) or None


PROMPT_FIELDS = frozenset({"prompt", "caption", "variant"})


class MaskConfig(Strict):
    """Inpaint mask (white: repainted), made per row from one annotator's output or read from the source."""

    annotator: str | None = Field(None, description="Annotator id: a seg_ade20k annotator (with `classes`) or a pose "
                                                    "annotator (the bounding box of the people it found).")
    source: bool = Field(False, description="Use the mask of each input from source.mask_column instead (its white "
                                            "part is the region).")
    classes: list[int] = Field([], description="seg_ade20k: ADE20K class indices forming the region (12: person).")
    repaint: Literal["inside", "outside"] | None = Field(
        None, description="outside: repaint everything but the region (keep the subject; the default for "
                          "annotators); inside: the region (the default for source masks).")
    margin: int = Field(0, ge=0, description="Grow the region by this many pixels before masking.")


AUTO_BATCH = {"cuda": 16, "cpu": 8}  # generation.batch_size auto: where a call starts (halved on out-of-memory)


class GenerationConfig(Strict):
    family: str = Field("sd15", description="Generator family: a module of pipeline/generators (sd15: Stable "
                                            "Diffusion 1.x + ControlNet).")
    base_model: str = Field(description="Hub repo id or local directory of the family's diffusers pipeline.")
    revision: str | None = None
    controlnets: list[ControlNetConfig] = Field(min_length=1)
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = Field(
        "auto", description="auto: float16 on GPU (bfloat16 for flux and sd3), float32 on CPU."
    )
    local_files_only: bool = False
    allow_pickle: bool = Field(
        False, description="Also load pickle checkpoints (.bin/.ckpt). Default: safetensors only, as pickle can run code."
    )
    scheduler: Literal[SCHEDULERS] = Field(  # type: ignore[valid-type]
        "unipc", description="sd15/sdxl: unipc, dpmpp_2m, ddim, euler_a; flux/sd3: flow_match_euler (their default).")
    mode: Literal[MODES] = Field(  # type: ignore[valid-type]
        "text2img", description="text2img; img2img (the source image is the starting point, `strength`); inpaint "
                                "(`mask` says what is repainted, `strength`).")
    strength: float = Field(0.8, gt=0, le=1, description="img2img/inpaint: how far the source is noised (1: fully).")
    mask: MaskConfig | None = Field(None, description="inpaint: where the mask comes from.")
    guess_mode: bool = Field(False, description="sd15/sdxl: the ControlNet recognises the content without prompt "
                                                "(ControlNet's guess mode; guidance_scale 3-5 recommended).")
    true_cfg_scale: float = Field(1.0, ge=1, description="flux text2img: real classifier-free guidance with the negative "
                                                         "prompt when > 1 (twice the compute).")
    steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0)
    variants_per_image: int = Field(1, ge=1)
    prompt: PromptConfig = PromptConfig()
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        8, description="Samples per batch of the generator (a pipeline call's samples share a size; on a CPU "
                       "with two lanes, a batch is two calls of half of it). On out-of-memory a call is halved until "
                       "it fits, and that size kept. auto: 16 on a GPU, 8 elsewhere.")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="Run the UNet, ControlNets and VAE in channels_last memory format (faster convolutions, "
                            "outputs within one level of the default layout). auto: on a GPU. true on CPU: one "
                            "pipeline call at a time (not two side by side: shared channels_last weights gave "
                            "irreproducible samples).")
    compile: bool = Field(
        False, description="torch.compile the denoiser (UNet or transformer) on a GPU worker: faster steps once "
                           "compiled, at the cost of compiling at the first call of each new image or batch size "
                           "(then with dynamic shapes); the seconds it takes are reported as the stage "
                           "`generate:compile` (part of `generate`'s time). CPU and mps workers run eagerly (with a "
                           "warning): inductor's CPU code gave NaN images on AVX2 CPUs.")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per actor, used when the cluster has GPUs.")
    num_cpus: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="CPUs per actor when it runs on CPU: two pipeline calls run at once on half of them each "
                            "(one call with one CPU; the second only while the rest of the machine leaves it those "
                            "cores); auto: every CPU of a node (generation is the heavy stage).")
    actors: int = Field(1, ge=1, description="Maximum actor pool size.")

    def calls_of(self, device: str) -> int:
        """Samples per pipeline call on `device` (cuda, mps, cpu): `batch_size`, or what auto means there."""
        return self.batch_size if self.batch_size != "auto" else AUTO_BATCH.get(device, AUTO_BATCH["cpu"])

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        from pipeline.generators import families

        if family not in families():
            raise ValueError(f"unknown generator family {family!r}; known: {list(families())}")
        return family

    @model_validator(mode="before")
    @classmethod
    def _family_scheduler(cls, data: Any) -> Any:
        """A family's own default scheduler (flow_match_euler for flux and sd3)."""
        from pipeline.generators import families, generator_class

        if isinstance(data, dict) and "scheduler" not in data and data.get("family", "sd15") in families():
            default = generator_class(data.get("family", "sd15")).schedulers[0]
            data = {**data, "scheduler": default} if default != "unipc" else data
        return data


class CaptionerConfig(Strict):
    """The captioning stage after decode: writes `caption` for rows without one (all rows with `overwrite`)."""

    kind: str = Field("blip", description="Captioner: a module of pipeline/captioners (blip: transformers "
                                          "BlipForConditionalGeneration; florence2: Florence2ForConditionalGeneration).")
    model: str = Field(description="Hub repo id or local directory (save_pretrained layout: model and processor).")
    revision: str | None = None
    task: str | None = Field(None, description="florence2: <CAPTION> (default), <DETAILED_CAPTION> or "
                                               "<MORE_DETAILED_CAPTION>; blip takes none.")
    overwrite: bool = Field(False, description="Caption every row, also those with a caption from the source.")
    max_new_tokens: int = Field(40, ge=1, le=1024, description="Longest caption, in tokens (greedy decoding).")
    batch_size: int = Field(8, ge=1)
    actors: int = Field(1, ge=1, description="Maximum actor pool size.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor, used when the cluster has GPUs (0: CPU).")
    num_cpus: float = Field(1.0, gt=0)
    local_files_only: bool = False

    @model_validator(mode="after")
    def _known_kind_and_task(self) -> CaptionerConfig:
        from pipeline.captioners import CAPTIONERS

        if self.kind not in CAPTIONERS:
            raise ValueError(f"unknown captioner kind {self.kind!r}; known: {sorted(CAPTIONERS)}")
        tasks = CAPTIONERS[self.kind].tasks
        if self.task is not None and self.task not in tasks:
            raise ValueError(f"task {self.task!r} is not one of {list(tasks)} for captioner {self.kind}"
                             if tasks else f"captioner {self.kind} takes no task")
        return self

    @property
    def effective_task(self) -> str | None:
        from pipeline.captioners import CAPTIONERS

        tasks = CAPTIONERS[self.kind].tasks
        return self.task or (tasks[0] if tasks else None)


class QualityConfig(Strict):
    """The quality gate after generation: control fidelity per condition (the same annotator re-run on the
    generated image, compared with the source's control map), optional CLIP and sharpness scores, and
    what happens to samples below the thresholds."""

    min: dict[str, float] = Field({}, description="Lower bounds: annotator id (metrics where higher is better: edge "
                                                  "F1, SSIM, mIoU, PCK), `clip` or `sharpness` -> threshold.")
    max: dict[str, float] = Field({}, description="Upper bounds: annotator id (error metrics: depth RMSE, normals "
                                                  "angular error) -> threshold.")
    action: Literal["flag", "drop"] = Field("flag", description="flag: every sample stays in samples/ with `passed`; "
                                                                "drop: samples that fail go to rejected/ (same schema).")
    conditions: list[str] | None = Field(None, description="Annotator ids to score (default: every one with a metric).")
    pck_alpha: float = Field(0.2, gt=0, le=1, description="Pose: a keypoint matches within this fraction of the "
                                                          "person's box.")
    clip_model: str | None = Field(None, description="CLIP model (hub id or local directory, transformers CLIPModel) "
                                                     "for `clip_score`; none: no CLIP score.")
    clip_revision: str | None = None
    sharpness: bool = Field(False, description="Add `sharpness_score` (variance of the Laplacian).")
    batch_size: int = Field(8, ge=1)
    actors: int = Field(1, ge=1, description="Maximum actor pool size of the scoring stage.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per scoring actor, used when the cluster has GPUs.")
    num_cpus: float = Field(1.0, gt=0)


class OutputConfig(Strict):
    path: str = Field(min_length=1, description="Output directory; local path or fsspec URL.")
    overwrite: bool = Field(False, description="Replace what an earlier run wrote under path.")
    new_version: bool = Field(
        False, description="If path holds a run of another config, write to path-v2 (-v3, ...) instead of refusing."
    )
    storage_options: dict[str, Any] = {}
    rows_per_file: int = Field(1000, ge=1, description="Upper bound of rows per Parquet file.")
    layout: Literal["flat", "normalized"] = Field(
        "flat", description="flat: every sample row carries its source image and control maps; normalized: they are "
                            "written once per source to sources/ and samples refer to them by source_sha256 (N "
                            "variants: N times fewer copies). Needs generation.")

    @model_validator(mode="after")
    def _one_policy(self) -> OutputConfig:
        if self.overwrite and self.new_version:
            raise ValueError("set at most one of overwrite and new_version")
        return self


class JobConfig(Strict):
    seed: int = Field(0, ge=0, description="Job seed; sample ids and seeds derive from it.")
    source: SourceConfig
    image: ImageConfig = ImageConfig()
    captioner: CaptionerConfig | None = Field(None, description="Caption the images that have no caption (a "
                                                               "captioning model run after decode).")
    annotators: list[AnnotatorConfig] = Field(min_length=1)
    generation: GenerationConfig | None = Field(
        None, description="Omit for an annotate-only job: rows of image, control maps, caption and keypoints."
    )
    quality: QualityConfig | None = Field(None, description="Score every generated sample and gate on the scores "
                                                           "(needs generation).")
    output: OutputConfig

    @model_validator(mode="after")
    def _cross_checks(self) -> JobConfig:
        from pipeline.annotators import ANNOTATORS

        keys = [a.key for a in self.annotators]
        if len(set(keys)) != len(keys):
            raise ValueError(f"annotator ids must be unique, got {keys}; set `id` to tell them apart")
        for i, a in enumerate(self.annotators):
            if a.name not in ANNOTATORS:
                raise ValueError(f"annotators.{i}.name: unknown annotator {a.name!r}; known: {sorted(ANNOTATORS)}")
            if (a.model or a.revision) and not ANNOTATORS[a.name].files:
                raise ValueError(f"annotators.{i}.{'model' if a.model else 'revision'}: {a.name} has no model weights "
                                 f"to choose")
            try:
                ANNOTATORS[a.name].Params(**a.params)
            except ValidationError as e:
                raise ValueError(f"annotators.{i}.params: {_first_error(e)}") from None
        if self.output.layout == "normalized" and not self.generation:
            raise ValueError("output.layout: normalized needs a generation section (an annotate-only job writes one "
                             "row per source already)")
        if self.source.prompt_column and not self.generation:
            raise ValueError("source.prompt_column: prompts need a generation section")
        if self.source.prompt_column and self.generation and self.generation.prompt.file:
            raise ValueError("set at most one of source.prompt_column and generation.prompt.file")
        if self.generation and (given := self.generation.prompt.unused_prompts(self.source.prompt_column)):
            raise ValueError(f"generation.prompt.template {self.generation.prompt.template!r} has no {{prompt}} field: "
                             f"{given} would not be used; add {{prompt}} to the template, or remove {given}")
        if self.generation and self.generation.prompt.prompts_given and (
                self.generation.prompt.file or self.source.prompt_column):
            raise ValueError(f"generation.prompt.prompts would not be used: each image's prompt comes from "
                             f"{'generation.prompt.file' if self.generation.prompt.file else 'source.prompt_column'}; "
                             f"remove one of them")
        for i, cn in enumerate(self.generation.controlnets if self.generation else []):
            if cn.condition not in keys:
                raise ValueError(f"generation.controlnets.{i}.condition: {cn.condition!r} is not an annotator id {keys}")
        if self.generation:  # the family's own checks (modes, knobs, control modes); may fill in derived values
            from pipeline.generators import generator_class

            object.__setattr__(self, "generation", generator_class(self.generation.family).check(self))
        if self.quality is not None:
            check_quality(self.quality, {a.key: a.name for a in self.annotators}, self.generation is not None)
        return self


def check_quality(quality: QualityConfig, annotators: dict[str, str], generates: bool) -> None:
    """The quality section against the job's annotators (id -> name): each bound names a scored
    condition (or clip, sharpness) in the direction its metric runs."""
    from pipeline.scorers.base import CLIP, CLIP_RANGE, SHARPNESS, metric_for

    if not generates:
        raise ValueError("quality: needs a generation section (it scores generated images)")
    for key in (CLIP, SHARPNESS):
        if key in annotators:
            raise ValueError(f"quality: annotator id {key!r} is reserved for the {key} score; set another `id`")
    scored = quality.conditions if quality.conditions is not None else [k for k, n in annotators.items() if metric_for(n)]
    for i, key in enumerate(quality.conditions or []):
        if key not in annotators:
            raise ValueError(f"quality.conditions.{i}: {key!r} is not an annotator id {list(annotators)}")
        if metric_for(annotators[key]) is None:
            raise ValueError(f"quality.conditions.{i}: annotator {annotators[key]!r} has no fidelity metric")
    for bound, limits in (("min", quality.min), ("max", quality.max)):
        for key, threshold in limits.items():
            hint = ""
            if key == CLIP:
                if quality.clip_model is None:
                    raise ValueError(f"quality.{bound}.clip: set quality.clip_model to compute a CLIP score")
                want, (low, high), hint = "min", CLIP_RANGE, " (torchmetrics' CLIPScore is 100 times this score)"
            elif key == SHARPNESS:
                if not quality.sharpness:
                    raise ValueError(f"quality.{bound}.sharpness: set quality.sharpness=true to compute it")
                want, low, high = "min", 0.0, float("inf")
            elif key not in scored:
                raise ValueError(f"quality.{bound}.{key}: not a scored condition (scored: {scored}, clip, sharpness)")
            else:
                metric = metric_for(annotators[key])
                want, low, high = metric.bound, metric.low, metric.high
            if bound != want:
                raise ValueError(f"quality.{bound}.{key}: higher is {'better' if want == 'min' else 'worse'} for "
                                 f"this score; give its threshold under quality.{want}")
            if not low <= threshold <= high:
                raise ValueError(f"quality.{bound}.{key}: {threshold:g} is outside the score's range {low:g}..{high:g}"
                                 f"{hint}, so every sample would {'fail' if (threshold > high) == (bound == 'min') else 'pass'}")


def _first_error(e: ValidationError) -> str:
    return error_lines(e)[0]


def load_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> JobConfig:
    """Read a YAML job config, apply `--set` overrides, validate. Raises ConfigError with the key path."""
    if data is None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
        try:
            data = load_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides:
        apply_override(data, assignment, JobConfig)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid config: " + format_errors(e)) from None


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of a job config (written to schemas/job_config.schema.json)."""
    return JobConfig.model_json_schema()
