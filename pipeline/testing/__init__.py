"""Tiny random-weight models with the real architectures, for offline runs and tests.

`make_tiny(out_dir)` writes, in the standard on-disk layouts, the diffusion models (`diffusion.py`:
a Stable Diffusion 1.5-style pipeline and one ControlNet per condition) and the annotators' weights
(`annotators.py`), so that the real loaders (`StableDiffusionControlNetPipeline.from_pretrained`,
`ControlNetModel.from_pretrained`, controlnet-aux's and transformers' `from_pretrained`) load them
from a local directory. The weights are random: the models run end to end at real shapes (VAE and
ControlNet conditioning downsample 8x, 77-token prompts) but generate noise.

Layout under out_dir:

    stable-diffusion/          StableDiffusionPipeline.save_pretrained (no safety checker)
    controlnet-<cond>/         ControlNetModel.save_pretrained, one per condition
    annotators/                annotator checkpoints under their real file names
    README.md
    tiny_models.json           marker written last: {"seed": ..., "conditions": [...], "annotators": [...]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pipeline.testing.annotators import ANNOTATOR_DIRS, HEAVY, annotator_names, write_annotators
from pipeline.testing.captioners import WRITERS as CAPTIONER_WRITERS
from pipeline.testing.captioners import write_captioners
from pipeline.testing.diffusion import family_names, family_paths, write_controlnet, write_family, write_stable_diffusion

__all__ = ["HEAVY", "MARKER", "make_tiny", "write_annotators"]

MARKER = "tiny_models.json"

README = """\
# Tiny random-weight test models

Written by `pipeline.testing.make_tiny`. These models have the real architectures
(Stable Diffusion 1.5 pipeline, ControlNets, annotators) but tiny sizes and
RANDOM weights: they load through the real loaders and run end to end, but they
generate noise. Use them only for offline runs and tests.
"""



def make_tiny(out_dir: str | Path, conditions: Sequence[str] = ("canny", "hed"), seed: int = 0,
              annotators: Sequence[str] | None = None, families: Sequence[str] = ("sd15",),
              captioners: Sequence[str] | str = ("blip", "florence2")) -> dict[str, str]:
    """Write tiny models under out_dir; return {"base_model": path, "controlnet/<cond>": path, ...,
    "annotators": path}.

    `families` names the generator families whose models to write besides SD 1.5 (`all` for every one);
    family F's models are keyed "F/base_model" and "F/controlnet/<cond>" (one "F/controlnet" for Union
    families), see `pipeline.testing.diffusion.write_family`.

    `annotators` names the annotators whose weights to write (default: DEFAULT_ANNOTATORS, every
    neural annotator whose full-size random checkpoint is small; "all" for every one). A model
    field of a job config can point at `annotators` for all of them.

    `captioners` names the captioner kinds to write (`pipeline.testing.captioners`: BLIP and Florence-2
    by default, a few hundred KB each), keyed "captioner/<kind>" (directory `captioner-<kind>`).

    Deterministic for a given seed. If out_dir already holds a complete set written by this
    function with the same seed, conditions and annotators (the marker file is written last),
    nothing is rewritten.
    """
    out = Path(out_dir)
    conditions = list(conditions)
    paths = {"base_model": str(out / "stable-diffusion")}
    for cond in conditions:
        paths[f"controlnet/{cond}"] = str(out / f"controlnet-{cond}")
    paths["annotators"] = str(out / "annotators")

    marker = out / MARKER
    annotators = annotator_names(annotators)
    for name in annotators:  # save_pretrained models live in their own directory
        if name in ANNOTATOR_DIRS:
            paths[f"annotator/{name}"] = str(out / "annotators" / ANNOTATOR_DIRS[name][0])
    families = family_names(families)
    for family in families:
        paths.update(family_paths(out, family, conditions))
    wanted = {"seed": seed, "conditions": conditions, "annotators": annotators}
    wanted |= {"families": families} if families != ["sd15"] else {}
    captioners = list(CAPTIONER_WRITERS) if captioners == "all" else list(captioners)
    if unknown := [c for c in captioners if c not in CAPTIONER_WRITERS]:  # before anything is written
        raise ValueError(f"no tiny models for captioners {unknown}; known: {list(CAPTIONER_WRITERS)}")
    paths.update({f"captioner/{kind}": str(out / f"captioner-{kind}") for kind in captioners})
    wanted |= {"captioners": captioners}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return paths

    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    write_stable_diffusion(out / "stable-diffusion", seed)
    for index, cond in enumerate(conditions):
        write_controlnet(out / f"controlnet-{cond}", seed + index)
    for family in families:
        write_family(out, family, conditions, seed)
    write_annotators(out / "annotators", annotators, seed)
    write_captioners(out, captioners, seed)
    (out / "README.md").write_text(README)
    marker.write_text(json.dumps(wanted, indent=2) + "\n")
    return paths

