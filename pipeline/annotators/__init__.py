"""The annotator registry: every control condition behind one batch interface.

An annotator takes a batch of RGB uint8 arrays and returns one RGB uint8 control map per image,
each exactly the size of its input (no silent change of aspect ratio, no rounding to multiples of
64). Weight-free annotators run as Ray tasks; annotators with weights (`default_model` set) run in
an actor pool so the network loads once per actor, and run same-shape images of a batch through
the network in one forward pass.

Neural annotators wrap controlnet-aux's own networks and loaders (or transformers' for the models
controlnet-aux lacks) and reproduce controlnet-aux's pre- and post-processing at the image's own
size. Where a network needs sides that are multiples of some number, the network input is padded
(reflected) or resized to it and the output cropped or resized back; `size` in the provenance says
which. Pose annotators (`keypoints = True`) also return the keypoints of every image in OpenPose
JSON format.

base.py holds the base classes, the registry and the shared helpers; each family is a module whose
classes register on import, in the order of FAMILIES (the order `annotators` lists them in).
"""

import importlib

from pipeline.annotators.base import ANNOTATORS, Annotator, image_seed, register

FAMILIES = ("opencv", "edges", "lines", "depth", "normals", "segmentation", "pose", "dwpose")
for _family in FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")

__all__ = ["ANNOTATORS", "FAMILIES", "Annotator", "image_seed", "register"]
