"""The registry of control-fidelity metrics: which metric scores which annotator's condition, in which
direction, and the pass/fail rule of the quality gate.

A metric compares the control map of the source (`control_<id>`, or `keypoints_<id>` for pose) with
the map the same annotator (same parameters, same weights) draws on the generated image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.scorers import metrics

CLIP, SHARPNESS = "clip", "sharpness"  # threshold keys of the two image scores (annotator ids may not use them)


@dataclass(frozen=True)
class Metric:
    name: str  # recorded in each row's score provenance
    fn: Callable[..., Any]
    higher_is_better: bool
    description: str
    low: float = 0.0  # the range of its scores: a threshold outside it passes every sample or none
    high: float = 1.0
    keypoints: bool = False  # compares OpenPose JSON (keypoints_<id>) instead of control maps

    @property
    def bound(self) -> str:
        """The threshold key a gate on this metric uses: `min` or `max`."""
        return "min" if self.higher_is_better else "max"


EDGE_F1 = Metric("edge_f1", metrics.edge_f1, True, "F1 of the edge pixels (gray >= 128), 0..1")
SSIM = Metric("ssim", metrics.ssim_auto, True, "SSIM of the gray maps, multi-scale (MS-SSIM, 5 scales) when both sides "
                                               f"are at least {metrics.MS_SSIM_MIN_SIDE} px, -1..1 (1: equal)", low=-1.0)
RMSE = Metric("rmse", metrics.rmse, False, "RMSE of the 8-bit maps, 0..255 (0: equal)", high=255.0)
MIOU = Metric("miou", metrics.miou, True, "mean IoU over the palette classes present in either map, 0..1")
PCK = Metric("pck", metrics.pose_pck, True, "PCK of the body keypoints within quality.pck_alpha (0.2) of each expected person's box, people "
                                            "paired one to one and a missing or extra person scoring 0, 0..1",
             keypoints=True)
ANGULAR = Metric("angular_error", metrics.angular_error, False, "mean angle between the normals, in degrees, 0..180",
                 high=180.0)

# annotator name -> metric; conditions not listed here (shuffle: a random warp) have no fidelity score
METRIC_OF: dict[str, Metric] = {
    "canny": EDGE_F1,
    "binary": EDGE_F1,
    **{name: SSIM for name in ("hed", "hed_safe", "pidinet", "pidinet_safe", "teed", "scribble_hed", "scribble_pidinet",
                               "scribble_xdog", "mlsd", "lineart", "lineart_coarse", "lineart_anime",
                               "lineart_standard", "tile")},
    **{name: RMSE for name in ("depth_midas", "depth_leres", "depth_anything", "depth_zoe", "color")},
    "seg_ade20k": MIOU,
    **{name: PCK for name in ("openpose", "openpose_hand", "openpose_face", "openpose_full", "dwpose")},
    "normal_bae": ANGULAR,
}


def metric_for(annotator: str) -> Metric | None:
    return METRIC_OF.get(annotator)


CLIP_DOC = ("CLIP score: cosine similarity of the CLIP embeddings of the prompt and the generated image, -1..1 "
            "(torchmetrics' CLIPScore is 100 * max(this, 0)).")
CLIP_RANGE = (-1.0, 1.0)
SHARPNESS_DOC = "sharpness: variance of the Laplacian of the generated image's gray levels (0: flat; blur lowers it)."


def passes(scores: dict[str, float | None], minimum: dict[str, float], maximum: dict[str, float]) -> bool:
    """Whether every configured bound holds (keys: annotator ids, `clip`, `sharpness`). A score that
    could not be computed (None, NaN) fails its bound."""
    for key, bound in minimum.items():
        value = scores.get(key)
        if value is None or not value >= bound:
            return False
    for key, bound in maximum.items():
        value = scores.get(key)
        if value is None or not value <= bound:
            return False
    return True
