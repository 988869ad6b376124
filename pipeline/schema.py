"""The output contract: Parquet schemas of `samples/` and `errors/`, generated into `schemas/`.

Image columns are Hugging Face `datasets` image structs ({bytes, path}) and the Parquet files carry
`datasets` feature metadata, so `load_dataset("parquet", ...)` decodes them as images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TIMESTAMP = pa.timestamp("us", tz="UTC")
ANNOTATOR = pa.struct(
    [
        ("id", pa.string()),
        ("name", pa.string()),
        ("params", pa.string()),
        ("package", pa.string()),
        ("model", pa.string()),
        ("revision", pa.string()),
        ("weights_file", pa.string()),
        ("weights_sha256", pa.string()),
        ("size_policy", pa.string()),
    ]
)

CONTROL_COLUMN = "control_{id}"
CONTROL_DOC = "Control map of the annotator with this id, at the image's size (PNG)."
KEYPOINTS_COLUMN = "keypoints_{id}"
KEYPOINTS_DOC = ("Keypoints of a pose annotator with this id, OpenPose JSON: {people: [{pose_keypoints_2d, "
                 "hand_left_keypoints_2d, hand_right_keypoints_2d, face_keypoints_2d}], canvas_width, "
                 "canvas_height}; pixel coordinates, [x, y, confidence] per point. Only for pose annotators.")

# (name, type, description); control columns go after `image`.
SAMPLE_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("sample_id", pa.string(), "Deterministic id from (job seed, source sha256, variant index)."),
    ("source_uri", pa.string(), "Where the source image was read from."),
    ("source_sha256", pa.string(), "sha256 of the source file's bytes."),
    ("caption", pa.string(), "Caption from the source, if any."),
    ("variant_index", pa.int32(), "Index of this variant among the source's variants."),
    ("seed", pa.int64(), "Seed of this sample's torch.Generator."),
    ("prompt", pa.string(), "Prompt used for generation."),
    ("negative_prompt", pa.string(), "Negative prompt used for generation."),
    ("width", pa.int32(), "Width of image, control maps and generated image."),
    ("height", pa.int32(), "Height of image, control maps and generated image."),
    ("transform", pa.string(), "JSON record of the decode: original size and mode, EXIF orientation, resize."),
    ("image", IMAGE, "The source image after the size policy (PNG)."),
    ("generated", IMAGE, "The generated image (PNG)."),
    ("annotators", pa.list_(ANNOTATOR), "Provenance of every control map: annotator, params (JSON), weights."),
    ("base_model", pa.string(), "Stable Diffusion model: hub id or local directory."),
    ("base_model_revision", pa.string(), "Resolved commit hash (hub) or sha256 fingerprint (directory)."),
    ("controlnet_models", pa.list_(pa.string()), "ControlNet models, one per condition."),
    ("controlnet_revisions", pa.list_(pa.string()), "Resolved revisions of the ControlNets."),
    ("controlnet_conditions", pa.list_(pa.string()), "Annotator id feeding each ControlNet."),
    ("controlnet_conditioning_scale", pa.list_(pa.float64()), "Per-ControlNet conditioning scale."),
    ("control_guidance_start", pa.list_(pa.float64()), "Per-ControlNet guidance start (fraction of steps)."),
    ("control_guidance_end", pa.list_(pa.float64()), "Per-ControlNet guidance end (fraction of steps)."),
    ("scheduler", pa.string(), "Scheduler name (unipc, dpmpp_2m, ddim, euler_a)."),
    ("num_inference_steps", pa.int32(), "Denoising steps."),
    ("guidance_scale", pa.float64(), "Classifier-free guidance scale."),
    ("dtype", pa.string(), "Torch dtype of the diffusion models."),
    ("run_id", pa.string(), "The run that wrote this row."),
    ("code_version", pa.string(), "Version of this pipeline (package version and git commit)."),
    ("created_at", TIMESTAMP, "When the row was written (UTC)."),
]

ERROR_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("source_uri", pa.string(), "The input the error belongs to."),
    ("source_sha256", pa.string(), "sha256 of the input's bytes, when they could be read."),
    ("sample_id", pa.string(), "The sample that failed, for errors after variant expansion."),
    ("variant_index", pa.int32(), "The variant that failed, for errors after variant expansion."),
    ("stage", pa.string(), "Stage that rejected the row: decode, annotate:<id>, expand, generate."),
    ("error_type", pa.string(), "Exception type."),
    ("error_message", pa.string(), "Readable reason."),
    ("run_id", pa.string(), "The run that wrote this row."),
    ("created_at", TIMESTAMP, "When the row was written (UTC)."),
]


def _with_hf_features(schema: pa.Schema) -> pa.Schema:
    features = {f.name: {"_type": "Image"} for f in schema if f.type == IMAGE}
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


# columns only generation jobs have; an annotate-only job's samples are the rest
GENERATION_COLUMNS = ("variant_index", "seed", "prompt", "negative_prompt", "generated", "base_model",
                      "base_model_revision", "controlnet_models", "controlnet_revisions", "controlnet_conditions",
                      "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "scheduler",
                      "num_inference_steps", "guidance_scale", "dtype")


def samples_schema(control_ids: list[str], keypoint_ids: list[str] = (), generated: bool = True) -> pa.Schema:
    fields = []
    for name, type_, _ in SAMPLE_COLUMNS:
        if not generated and name in GENERATION_COLUMNS:
            continue
        fields.append(pa.field(name, type_))
        if name == "image":
            fields.extend(pa.field(CONTROL_COLUMN.format(id=c), IMAGE) for c in control_ids)
            fields.extend(pa.field(KEYPOINTS_COLUMN.format(id=c), pa.string()) for c in keypoint_ids)
    return _with_hf_features(pa.schema(fields))


def errors_schema() -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t, _ in ERROR_COLUMNS])


def describe(columns: list[tuple[str, pa.DataType, str]]) -> list[dict[str, str]]:
    return [{"name": n, "type": str(t), "description": d} for n, t, d in columns]


def schema_documents() -> dict[str, Any]:
    """The machine-readable contracts written to schemas/ (file name -> JSON document)."""
    from pipeline.config import config_json_schema

    samples = describe(SAMPLE_COLUMNS)
    at = [c["name"] for c in samples].index("image") + 1
    samples.insert(at, {"name": CONTROL_COLUMN, "type": str(IMAGE), "description": CONTROL_DOC + " One column per annotator."})
    samples.insert(at + 1, {"name": KEYPOINTS_COLUMN, "type": str(pa.string()), "description": KEYPOINTS_DOC})
    return {
        "job_config.schema.json": config_json_schema(),
        "samples.schema.json": {"title": "samples/*.parquet", "image_columns": "Hugging Face datasets Image structs",
                                "columns": samples, "generation_only_columns": list(GENERATION_COLUMNS)},
        "errors.schema.json": {"title": "errors/*.parquet", "columns": describe(ERROR_COLUMNS)},
    }


def write_schema_files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in schema_documents().items():
        path = directory / name
        path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        written.append(path)
    return written
