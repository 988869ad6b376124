"""The metrics, as plain functions of two control maps (uint8 H x W x 3) or two OpenPose documents.

They follow the choices of the ControlNet++ evaluation (Li et al., arXiv 2404.07987): per-pixel F1 of
binary edge maps, SSIM for soft edges and lines, RMSE for depth, mIoU for segmentation; pose and
normals, which ControlNet++ does not evaluate, get PCK and the mean angular error. Each equals the
reference implementation named in its docstring (the tests check this on fixed arrays):

- `edge_f1`: torchmetrics `binary_f1_score` of the maps thresholded at 128;
- `ssim` / `ms_ssim`: torchmetrics `structural_similarity_index_measure` and
  `multiscale_structural_similarity_index_measure` (Gaussian window 11, sigma 1.5, data range 255,
  normalize="relu") on the maps' gray level;
- `rmse`: the square root of scikit-image's `mean_squared_error` of the 8-bit maps;
- `miou`: torchmetrics `multiclass_jaccard_index` (average="macro") over the colours present in either map;
- `angular_error`: mean angle in degrees between the normals the two maps encode;
- `laplacian_variance`: variance of OpenCV's 4-neighbour Laplacian of the gray image (sharpness).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

GAUSSIAN_SIZE, GAUSSIAN_SIGMA = 11, 1.5
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MIN_SIDE = (GAUSSIAN_SIZE - 1) * (len(MS_SSIM_BETAS) - 1) ** 2 + 16  # 176: every scale keeps 11 pixels


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")


def gray(image: np.ndarray) -> np.ndarray:
    """Mean of the channels as float64 (control maps are gray drawn in three equal channels)."""
    return image.astype(np.float64).mean(axis=2) if image.ndim == 3 else image.astype(np.float64)


def edge_f1(reference: np.ndarray, candidate: np.ndarray) -> float:
    """F1 of the edge pixels (gray level >= 128) of `candidate` against `reference`; 1.0 when both are empty."""
    _same_shape(reference, candidate)
    ref, cand = gray(reference) >= 128, gray(candidate) >= 128
    tp = int(np.count_nonzero(ref & cand))
    wrong = int(np.count_nonzero(ref ^ cand))
    return 1.0 if tp + wrong == 0 else 2 * tp / (2 * tp + wrong)


def _ssim_terms(x, y):
    """(SSIM averaged over the image, contrast-structure averaged over the valid region) of two
    (1, 1, H, W) float64 tensors, as torchmetrics computes them (reflect padding)."""
    import torch
    import torch.nn.functional as F

    pad = (GAUSSIAN_SIZE - 1) // 2
    dist = torch.arange((1 - GAUSSIAN_SIZE) / 2, (1 + GAUSSIAN_SIZE) / 2, 1.0, dtype=torch.float64)
    g = torch.exp(-((dist / GAUSSIAN_SIGMA) ** 2) / 2)
    g = g / g.sum()
    kernel = (g[:, None] @ g[None, :])[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    mx, my, xx, yy, xy = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), kernel).split(1)
    sx = torch.clamp(xx - mx * mx, min=0.0)
    sy = torch.clamp(yy - my * my, min=0.0)
    sxy = xy - mx * my
    upper, lower = 2 * sxy + c2, sx + sy + c2
    full = ((2 * mx * my + c1) * upper) / ((mx * mx + my * my + c1) * lower)
    cs = (upper / lower)[..., pad:-pad, pad:-pad]
    return float(full.mean()), float(cs.mean())


def _tensor(image: np.ndarray):
    import torch

    return torch.from_numpy(gray(image))[None, None]


def ssim(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Single-scale SSIM of the gray levels (data range 255); 1.0 for equal maps."""
    _same_shape(reference, candidate)
    if min(reference.shape[:2]) <= GAUSSIAN_SIZE // 2:
        raise ValueError(f"SSIM needs sides of at least {GAUSSIAN_SIZE // 2 + 1} pixels, got {reference.shape[:2]}")
    return _ssim_terms(_tensor(candidate), _tensor(reference))[0]


def ms_ssim(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Multi-scale SSIM (5 scales, Wang et al. 2003 weights; negative terms clipped at 0 as torchmetrics'
    normalize="relu"). Needs sides of at least MS_SSIM_MIN_SIDE pixels."""
    import torch.nn.functional as F

    _same_shape(reference, candidate)
    if min(reference.shape[:2]) < MS_SSIM_MIN_SIDE:
        raise ValueError(f"MS-SSIM needs sides of at least {MS_SSIM_MIN_SIDE} pixels, got {reference.shape[:2]}")
    x, y = _tensor(candidate), _tensor(reference)
    terms = []
    for _ in MS_SSIM_BETAS:
        sim, cs = _ssim_terms(x, y)
        terms.append(max(cs, 0.0))
        x, y = F.avg_pool2d(x, (2, 2)), F.avg_pool2d(y, (2, 2))
    terms[-1] = max(sim, 0.0)
    return float(np.prod([t**b for t, b in zip(terms, MS_SSIM_BETAS)]))


def ssim_auto(reference: np.ndarray, candidate: np.ndarray) -> float:
    """MS-SSIM where both sides allow it (>= 176 px), single-scale SSIM below."""
    if min(reference.shape[:2]) >= MS_SSIM_MIN_SIDE:
        return ms_ssim(reference, candidate)
    return ssim(reference, candidate)


def rmse(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Root mean squared error of the 8-bit values over every pixel and channel (0: equal; 255: black
    against white). For the gray maps of depth annotators this is the RMSE of the gray levels."""
    _same_shape(reference, candidate)
    return float(math.sqrt(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2)))


def color_classes(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Both colour maps as class indices over the colours present in either, and the number of classes."""
    _same_shape(reference, candidate)
    both = np.concatenate([reference.reshape(-1, 3), candidate.reshape(-1, 3)]).astype(np.uint32)
    codes = (both[:, 0] << 16) | (both[:, 1] << 8) | both[:, 2]
    _, labels = np.unique(codes, return_inverse=True)
    n = reference.shape[0] * reference.shape[1]
    return labels[:n].reshape(-1), labels[n:].reshape(-1), int(labels.max()) + 1


def miou(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean intersection over union of the colour classes (segmentation palettes), over the classes
    present in either map."""
    ref, cand, k = color_classes(reference, candidate)
    inter = np.bincount(ref[ref == cand], minlength=k)
    union = np.bincount(ref, minlength=k) + np.bincount(cand, minlength=k) - inter
    return float(np.mean(inter / union))


def normals(image: np.ndarray) -> np.ndarray:
    """Unit normals from a normal map (each channel maps [-1, 1] to [0, 255])."""
    n = image.astype(np.float64) / 255.0 * 2.0 - 1.0
    return n / np.maximum(np.linalg.norm(n, axis=2, keepdims=True), 1e-12)


def angular_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean angle between the normals of the two maps, in degrees (0: equal; 180: opposite)."""
    _same_shape(reference, candidate)
    cos = np.clip(np.sum(normals(reference) * normals(candidate), axis=2), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean())


def laplacian_variance(image: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the gray image (OpenCV, reflect-101 borders): high for
    sharp detail, near 0 for a blurred or flat image."""
    import cv2

    return float(cv2.Laplacian(gray(image), cv2.CV_64F).var())


# ---------------------------------------------------------------- pose


def body_points(person: dict[str, Any]) -> np.ndarray:
    """A person's body keypoints as (N, 3) [x, y, confidence]; confidence 0: not found."""
    flat = person.get("pose_keypoints_2d") or []
    return np.asarray(flat, dtype=np.float64).reshape(-1, 3)


def person_pck(expected: np.ndarray, found: np.ndarray, alpha: float) -> float:
    """Fraction of the expected person's visible points that `found` has within alpha times the longer
    side of the expected person's box (at least one pixel)."""
    visible = expected[:, 2] > 0
    if not visible.any():
        return 0.0
    pts = expected[visible, :2]
    box = max(float(np.ptp(pts[:, 0])), float(np.ptp(pts[:, 1])), 1.0)
    n = min(len(expected), len(found))
    hit = np.zeros(len(expected), dtype=bool)
    close = np.linalg.norm(expected[:n, :2] - found[:n, :2], axis=1) <= alpha * box
    hit[:n] = close & (found[:n, 2] > 0)
    return float(np.count_nonzero(hit & visible) / np.count_nonzero(visible))


def pose_pck(reference: str, candidate: str, alpha: float = 0.2) -> tuple[float, dict[str, int]]:
    """Keypoint agreement of two OpenPose documents: people are paired one to one (greedily, best PCK
    first), each expected person scores its PCK@alpha, and the sum is divided by the larger of the two
    people counts (a person missing or extra scores 0). 1.0 when neither has people.
    Returns (score, {"people_expected": n, "people_found": m})."""
    expected = [body_points(p) for p in json.loads(reference).get("people", [])]
    expected = [p for p in expected if (p[:, 2] > 0).any()] if expected else []
    found = [body_points(p) for p in json.loads(candidate).get("people", [])]
    found = [p for p in found if len(p) and (p[:, 2] > 0).any()]
    counts = {"people_expected": len(expected), "people_found": len(found)}
    if not expected and not found:
        return 1.0, counts
    pairs = sorted(((person_pck(e, f, alpha), i, j) for i, e in enumerate(expected) for j, f in enumerate(found)),
                   reverse=True)
    used_e, used_f, total = set(), set(), 0.0
    for score, i, j in pairs:
        if i not in used_e and j not in used_f:
            used_e.add(i)
            used_f.add(j)
            total += score
    return total / max(len(expected), len(found)), counts
