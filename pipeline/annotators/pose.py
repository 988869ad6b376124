"""Pose: skeletons drawn on black, keypoints kept as OpenPose JSON (the `keypoints_<id>` column).

OpenPose here (controlnet-aux's body, hand and face networks); DWPose in dwpose.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.annotators.base import NeuralAnnotator, register


def openpose_json(people: list[dict[str, list[float]]], width: int, height: int) -> str:
    """The OpenPose JSON document of one image: pixel coordinates, [x, y, confidence] per point,
    [0, 0, 0] for a point not found; a part list is empty when that part was not looked for."""
    return json.dumps({"people": people, "canvas_width": width, "canvas_height": height})


def flat_keypoints(points, width: int, height: int, count: int) -> list[float]:
    """[(x, y, score) normalised to [0, 1], or None] -> OpenPose's flat [x, y, c, ...] in pixels."""
    if points is None:
        return []
    flat: list[float] = []
    for p in list(points)[:count]:
        if p is None or p[0] < 0 or p[1] < 0:
            flat += [0.0, 0.0, 0.0]
        else:
            flat += [round(float(p[0]) * width, 3), round(float(p[1]) * height, 3), round(float(p[2]), 4)]
    return flat


class PoseAnnotator(NeuralAnnotator):
    """A pose annotator: per image a skeleton map and its keypoints as OpenPose JSON. Not grouped by
    shape: subclasses write `poses`, which takes the whole batch."""

    keypoints = True

    def annotate(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return self.annotate_with_extras(images)[0]

    def annotate_with_extras(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[str | None]]:
        rendered = self.poses(images)
        return [m for m, _ in rendered], [k for _, k in rendered]

    def poses(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """(skeleton map, OpenPose JSON) of each image."""
        raise NotImplementedError


@register
class OpenPose(PoseAnnotator):
    """controlnet-aux's OpenPose (body, hands, face networks) at the image's own size.

    Not batched: the body network runs on one image at its own rescaled size and the hand and face
    networks on per-person crops, as controlnet-aux's post-processing is written for one image."""

    name = "openpose"
    description = "OpenPose body skeleton (controlnet-aux OpenposeDetector); keypoints as OpenPose JSON."
    default_model = "lllyasviel/Annotators"
    files = ("body_pose_model.pth",)
    size = "detected and drawn at the image's own size (the body network pads to multiples of 8 itself)"
    HAND: ClassVar[bool] = False
    FACE: ClassVar[bool] = False

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.open_pose import Body, Face, Hand, OpenposeDetector

        d = Path(weights_dir)
        self.detector = OpenposeDetector(
            Body(str(d / "body_pose_model.pth")).to(self.device),
            Hand(str(d / "hand_pose_model.pth")).to(self.device) if self.HAND else None,
            Face(str(d / "facenet.pth")).to(self.device) if self.FACE else None,
        )

    def poses(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        return [self.render(self.detect(img), *img.shape[:2]) for img in images]

    def render(self, poses, h: int, w: int) -> tuple[np.ndarray, str]:
        """controlnet-aux PoseResults (coordinates normalised to [0, 1]) -> (skeleton map, OpenPose JSON)."""
        from controlnet_aux.open_pose import draw_poses

        canvas = draw_poses(poses, h, w, draw_body=True, draw_hand=self.HAND, draw_face=self.FACE)
        people = [
            {
                "pose_keypoints_2d": flat_keypoints(pose.body.keypoints, w, h, 18),
                "hand_left_keypoints_2d": flat_keypoints(pose.left_hand, w, h, 21),
                "hand_right_keypoints_2d": flat_keypoints(pose.right_hand, w, h, 21),
                "face_keypoints_2d": flat_keypoints(pose.face, w, h, 70),
            }
            for pose in poses
        ]
        return canvas, openpose_json(people, w, h)

    def detect(self, rgb: np.ndarray):
        """controlnet-aux's OpenposeDetector.detect_poses, keeping the body keypoints' scores."""
        from controlnet_aux.open_pose import BodyResult, Keypoint, PoseResult

        torch = self._torch
        detector = self.detector
        bgr = rgb[:, :, ::-1].copy()
        h, w = bgr.shape[:2]
        with torch.inference_mode():
            candidate, subset = detector.body_estimation(bgr)
            results = []
            for body in detector.body_estimation.format_body_result(candidate, subset):
                left, right = detector.detect_hands(body, bgr) if self.HAND else (None, None)
                face = detector.detect_face(body, bgr) if self.FACE else None
                keypoints = [Keypoint(k.x / float(w), k.y / float(h), k.score, k.id) if k is not None else None
                             for k in body.keypoints]
                results.append(PoseResult(BodyResult(keypoints, body.total_score, body.total_parts), left, right, face))
        return results


@register
class OpenPoseHand(OpenPose):
    name = "openpose_hand"
    description = "OpenPose body and hands (controlnet-aux OpenposeDetector include_hand)."
    files = ("body_pose_model.pth", "hand_pose_model.pth")
    HAND = True


@register
class OpenPoseFace(OpenPose):
    name = "openpose_face"
    description = "OpenPose body and face (controlnet-aux OpenposeDetector include_face)."
    files = ("body_pose_model.pth", "facenet.pth")
    FACE = True


@register
class OpenPoseFull(OpenPose):
    name = "openpose_full"
    description = "OpenPose body, hands and face (controlnet-aux OpenposeDetector hand_and_face)."
    files = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
    HAND = True
    FACE = True
