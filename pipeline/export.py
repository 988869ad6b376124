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
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.report import Output
from pipeline.schema import IMAGE
from pipeline.io.sources import filesystem

FORMATS = ("controlnet-train",)
TRAIN_SCHEMA = pa.schema([("image", IMAGE), ("conditioning_image", IMAGE), ("text", pa.string())]).with_metadata(
    {"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "conditioning_image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}}})}
)


class ExportError(ValueError):
    """The output cannot be exported as asked (no samples, unknown control map, destination in use)."""


def export_controlnet_train(src: str, dest: str, control: str | None = None, target: str | None = None,
                            overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `src`'s samples as (image, conditioning_image, text) rows under `dest`; returns what was done."""
    out = Output(src, storage_options or {})
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

    fs, root = filesystem(dest, storage_options or {})
    if fs.exists(posixpath.join(root, "train")) and not overwrite:
        raise ExportError(f"{dest} already holds an export (train/); choose another path or pass --overwrite")
    if overwrite and fs.exists(root):
        for name in ("train", "export.json", "README.md"):
            if fs.exists(posixpath.join(root, name)):
                fs.rm(posixpath.join(root, name), recursive=True)
    fs.makedirs(posixpath.join(root, "train"), exist_ok=True)
    files, rows = [], 0
    for i, path in enumerate(out.files("samples")):
        table = out.read_file(path, [target, f"control_{control}", text])
        captions = pc.fill_null(table.column(text), "")
        train = pa.Table.from_arrays([table.column(target), table.column(f"control_{control}"), captions], schema=TRAIN_SCHEMA)
        name = f"train/part-{i:05d}.parquet"
        tmp = posixpath.join(root, "train", f".tmp-{uuid.uuid4().hex}")
        with fs.open(tmp, "wb") as f:
            pq.write_table(train, f, compression="zstd")
        fs.mv(tmp, posixpath.join(root, name))
        files.append(name)
        rows += train.num_rows
    record = {"format": "controlnet-train", "source": src, "source_run_id": manifest.get("run_id"),
              "image": target, "conditioning_image": f"control_{control}", "text": text, "rows": rows, "files": files}
    with fs.open(posixpath.join(root, "export.json"), "w") as f:
        json.dump(record, f, indent=2)
    with fs.open(posixpath.join(root, "README.md"), "w") as f:  # tells `load_dataset(dest)` which files are data
        f.write(CARD.format(source=src, run_id=manifest.get("run_id"), target=target, control=control, text=text))
    return record


CARD = """---
configs:
- config_name: default
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
