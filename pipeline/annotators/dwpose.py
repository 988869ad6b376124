"""DWPose whole-body estimation on ONNX Runtime, without mmcv/mmdet/mmpose, and the `dwpose` annotator.

The two ONNX graphs DWPose publishes (yzd-v/DWPose): a YOLOX person detector (`yolox_l.onnx`,
640x640 input, raw YOLOX head output with sigmoid scores) and an RTMPose whole-body model with
SimCC heads (`dw-ll_ucoco_384.onnx`, 133 COCO-WholeBody keypoints). The pre- and post-processing
below is DWPose's own ONNX path (its onnxdet.py, onnxpose.py and wholebody.py), written out so
that no OpenMMLab package is needed. Graphs with a fixed batch of 1 run one image (one person
box) at a time; graphs with a dynamic batch axis take a whole batch in one call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.annotators.base import register
from pipeline.annotators.pose import PoseAnnotator, flat_keypoints, openpose_json

DET_INPUT = (640, 640)  # (height, width)
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
SIMCC_SPLIT_RATIO = 2.0


def run_session(session: Any, inputs: np.ndarray) -> list[np.ndarray]:
    """Run a single-input graph on a stack; loop when the graph's batch axis is fixed to 1."""
    spec = session.get_inputs()[0]
    if isinstance(spec.shape[0], int) and spec.shape[0] == 1 and len(inputs) > 1:
        parts = [session.run(None, {spec.name: inputs[i : i + 1]}) for i in range(len(inputs))]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
    return session.run(None, {spec.name: inputs})


# --- YOLOX person detector -------------------------------------------------------------------


def det_preprocess(bgr: np.ndarray, size: tuple[int, int] = DET_INPUT) -> tuple[np.ndarray, float]:
    padded = np.ones((size[0], size[1], 3), dtype=np.uint8) * 114
    r = min(size[0] / bgr.shape[0], size[1] / bgr.shape[1])
    resized = cv2.resize(bgr, (int(bgr.shape[1] * r), int(bgr.shape[0] * r)), interpolation=cv2.INTER_LINEAR)
    padded[: int(bgr.shape[0] * r), : int(bgr.shape[1] * r)] = resized.astype(np.uint8)
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32), r


def yolox_decode(outputs: np.ndarray, size: tuple[int, int] = DET_INPUT) -> np.ndarray:
    grids, strides = [], []
    for stride in (8, 16, 32):
        xv, yv = np.meshgrid(np.arange(size[1] // stride), np.arange(size[0] // stride))
        grid = np.stack((xv, yv), 2).reshape(1, -1, 2)
        grids.append(grid)
        strides.append(np.full((*grid.shape[:2], 1), stride))
    grids, strides = np.concatenate(grids, 1), np.concatenate(strides, 1)
    outputs = outputs.copy()
    outputs[..., :2] = (outputs[..., :2] + grids) * strides
    outputs[..., 2:4] = np.exp(outputs[..., 2:4]) * strides
    return outputs


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(overlap <= threshold)[0] + 1]
    return keep


def person_boxes(prediction: np.ndarray, ratio: float, nms_thr: float = 0.45, score_thr: float = 0.1,
                 keep_thr: float = 0.3) -> np.ndarray:
    """One image's decoded YOLOX output -> person boxes (x0, y0, x1, y1) in image pixels.

    DWPose runs class-aware NMS over all 80 classes and keeps class 0 above 0.3; NMS is per class,
    so running it on the person class alone gives the same boxes."""
    boxes = prediction[:, :4]
    person = prediction[:, 4] * prediction[:, 5]  # objectness x class-0 score
    xyxy = np.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2,
                     boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2], 1) / ratio
    valid = person > score_thr
    if not valid.any():
        return np.zeros((0, 4), np.float32)
    xyxy, person = xyxy[valid], person[valid]
    keep = nms(xyxy, person, nms_thr)
    xyxy, person = xyxy[keep], person[keep]
    return xyxy[person > keep_thr]


# --- RTMPose top-down whole-body model -------------------------------------------------------


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.r_[-d[1], d[0]]


def warp_matrix(center: np.ndarray, scale: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    src_w = scale[0]
    dst_w, dst_h = output_size
    src = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + np.array([0.0, src_w * -0.5])
    src[2] = _third_point(src[0], src[1])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + np.array([0.0, dst_w * -0.5])
    dst[2] = _third_point(dst[0], dst[1])
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def pose_preprocess(bgr: np.ndarray, boxes: np.ndarray, size: tuple[int, int]):
    """Crop each box (padded 1.25x, aspect fixed to the model's) to the model input (width, height);
    the whole image is one box when no person was detected, as DWPose does."""
    if len(boxes) == 0:
        boxes = np.array([[0, 0, bgr.shape[1], bgr.shape[0]]], np.float32)
    w, h = size
    crops, centers, scales = [], [], []
    for x0, y0, x1, y1 in boxes:
        center = np.array([x0 + x1, y0 + y1]) * 0.5
        scale = np.array([x1 - x0, y1 - y0]) * 1.25
        bw, bh = scale
        scale = np.array([bw, bw / (w / h)]) if bw > bh * (w / h) else np.array([bh * (w / h), bh])
        crop = cv2.warpAffine(bgr, warp_matrix(center, scale, (w, h)), (int(w), int(h)), flags=cv2.INTER_LINEAR)
        crops.append(((crop - MEAN) / STD).transpose(2, 0, 1))
        centers.append(center)
        scales.append(scale)
    return np.ascontiguousarray(np.stack(crops), dtype=np.float32), np.stack(centers), np.stack(scales)


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, k, _ = simcc_x.shape
    sx, sy = simcc_x.reshape(n * k, -1), simcc_y.reshape(n * k, -1)
    locs = np.stack((np.argmax(sx, 1), np.argmax(sy, 1)), -1).astype(np.float32)
    vals = np.minimum(np.amax(sx, 1), np.amax(sy, 1))
    locs[vals <= 0.0] = -1
    return locs.reshape(n, k, 2) / SIMCC_SPLIT_RATIO, vals.reshape(n, k)


def to_openpose_order(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO-WholeBody (133) -> DWPose's 134 points: a neck inserted at 17 and the body reordered as
    OpenPose's 18 points; then 6 feet, 68 face, 21 left hand, 21 right hand."""
    info = np.concatenate((keypoints, scores[..., None]), axis=-1)
    neck = np.mean(info[:, [5, 6]], axis=1)
    neck[:, 2:4] = np.logical_and(info[:, 5, 2:4] > 0.3, info[:, 6, 2:4] > 0.3).astype(int)
    info = np.insert(info, 17, neck, axis=1)
    mmpose_idx = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
    openpose_idx = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    info[:, openpose_idx] = info[:, mmpose_idx]
    return info[..., :2], info[..., 2]


class Wholebody:
    """DWPose's ONNX whole-body estimator: BGR image -> (keypoints (people, 134, 2) in pixels, scores)."""

    def __init__(self, det_path: str, pose_path: str, device: str = "cpu"):
        import onnxruntime as ort

        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]  # onnxruntime-gpu brings CUDA
        options = ort.SessionOptions()
        self.det = ort.InferenceSession(det_path, options, providers=providers)
        self.pose = ort.InferenceSession(pose_path, options, providers=providers)
        self.providers = self.det.get_providers()
        shape = self.pose.get_inputs()[0].shape  # (batch, 3, height, width)
        self.pose_size = (int(shape[3]), int(shape[2]))

    def detect(self, images_bgr: list[np.ndarray]) -> list[np.ndarray]:
        """Person boxes of each image; the detector input is 640x640 for every image, so one batch."""
        inputs, ratios = zip(*(det_preprocess(img) for img in images_bgr))
        predictions = yolox_decode(run_session(self.det, np.stack(inputs))[0])
        return [person_boxes(p, r) for p, r in zip(predictions, ratios)]

    def __call__(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.estimate([bgr])[0]

    def estimate(self, images_bgr: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        boxes = self.detect(images_bgr)
        crops, counts, centers, scales = [], [], [], []
        for img, b in zip(images_bgr, boxes):
            c, ce, sc = pose_preprocess(img, b, self.pose_size)
            crops.append(c), centers.append(ce), scales.append(sc), counts.append(len(c))
        simcc_x, simcc_y = run_session(self.pose, np.concatenate(crops))[:2]  # every person crop in one batch
        keypoints, scores = simcc_decode(simcc_x, simcc_y)
        keypoints = keypoints / np.array(self.pose_size) * np.concatenate(scales)[:, None] \
            + np.concatenate(centers)[:, None] - np.concatenate(scales)[:, None] / 2
        out, start = [], 0
        for n in counts:
            out.append(to_openpose_order(keypoints[start : start + n], scores[start : start + n]))
            start += n
        return out


# --- the annotator ---------------------------------------------------------------------------


@register
class DWPose(PoseAnnotator):
    name = "dwpose"
    description = ("DWPose whole body (YOLOX + RTMPose ONNX graphs on onnxruntime), drawn as controlnet-aux's "
                   "DWposeDetector does; keypoints as OpenPose JSON.")
    default_model = "yzd-v/DWPose"
    files = ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")  # the person detector, the pose model
    package = "onnxruntime"
    size = ("detector input letterboxed to 640x640 and person crops warped to the pose model's input, "
            "keypoints mapped back to the image's pixels and drawn at the image's own size")

    def load(self, weights_dir: str) -> None:
        self.estimator = Wholebody(*(str(Path(weights_dir) / f) for f in self.files), self.device)

    def poses(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """Every image in one estimator call: the detector input is 640x640 whatever the image's shape."""
        bgr = [np.ascontiguousarray(img[:, :, ::-1]) for img in images]  # DWPose takes BGR
        estimates = self.estimator.estimate(bgr)
        return [self.render(k, s, *img.shape[:2]) for img, (k, s) in zip(images, estimates)]

    @staticmethod
    def render(candidate: np.ndarray, subset: np.ndarray, h: int, w: int) -> tuple[np.ndarray, str]:
        """controlnet-aux's DWposeDetector.__call__ after its estimator, at (h, w); and the OpenPose JSON."""
        from controlnet_aux.dwpose import draw_pose

        candidate, subset = candidate.copy(), subset.copy()
        nums, _, locs = candidate.shape
        candidate[..., 0] /= float(w)
        candidate[..., 1] /= float(h)
        body = candidate[:, :18].copy().reshape(nums * 18, locs)
        score = subset[:, :18].copy()
        for i in range(len(score)):
            for j in range(len(score[i])):
                score[i][j] = int(18 * i + j) if score[i][j] > 0.3 else -1
        candidate[subset < 0.3] = -1
        hands = np.vstack([candidate[:, 92:113], candidate[:, 113:]])
        pose = {"bodies": {"candidate": body, "subset": score}, "hands": hands, "faces": candidate[:, 24:92]}
        canvas = draw_pose(pose, h, w)

        def part(person: int, start: int, stop: int) -> list[float]:
            points = [(x, y, c) if c >= 0.3 else None
                      for (x, y), c in zip(candidate[person, start:stop], subset[person, start:stop])]
            return flat_keypoints(points, w, h, stop - start)

        people = [{"pose_keypoints_2d": part(p, 0, 18), "hand_left_keypoints_2d": part(p, 92, 113),
                   "hand_right_keypoints_2d": part(p, 113, 134), "face_keypoints_2d": part(p, 24, 92)}
                  for p in range(nums)]
        return canvas, openpose_json(people, w, h)
