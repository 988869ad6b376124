"""Pose annotators: skeleton maps equal to controlnet-aux's, keypoints as OpenPose JSON, and the
`keypoints_<id>` column of the Annotate stage (only for pose annotators)."""

import json
import warnings

import numpy as np
import pyarrow as pa
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from controlnet_aux.dwpose import DWposeDetector
    from controlnet_aux.open_pose import BodyResult, Keypoint, OpenposeDetector, PoseResult

from pipeline.annotators import ANNOTATORS
from pipeline.annotators.dwpose import Wholebody, nms, person_boxes, yolox_decode
from pipeline.annotators.stage import Annotate
from pipeline.config import AnnotatorConfig
from pipeline.io.images import array_to_png
from pipeline.models import resolve_model
from tests.helpers import photo

OPENPOSE = {  # name -> controlnet-aux flags
    "openpose": {"include_hand": False, "include_face": False},
    "openpose_hand": {"include_hand": True, "include_face": False},
    "openpose_face": {"include_hand": False, "include_face": True},
    "openpose_full": {"include_hand": True, "include_face": True},
}


def photos() -> list[np.ndarray]:
    return [photo("astronaut", (128, 128)), photo("coffee", (192, 128)), photo("chelsea", (128, 192))]


@pytest.fixture(scope="module")
def weights(annotator_weights) -> dict[str, str]:
    return {name: annotator_weights(name) for name in ("dwpose", "openpose_full", *OPENPOSE)}


def make(name: str, weights: dict[str, str]):
    return ANNOTATORS[name]({}, model=resolve_model(weights[name], None, ANNOTATORS[name].files[0]))


@pytest.fixture(scope="module")
def dwpose(weights):
    return make("dwpose", weights)


def check_openpose_json(doc: str, h: int, w: int, hands: bool, face: bool, face_points: int, inside: bool = True) -> dict:
    keypoints = json.loads(doc)
    assert (keypoints["canvas_width"], keypoints["canvas_height"]) == (w, h)
    for person in keypoints["people"]:
        assert len(person["pose_keypoints_2d"]) == 3 * 18
        assert len(person["hand_left_keypoints_2d"]) == (3 * 21 if hands else 0) or person["hand_left_keypoints_2d"] == []
        assert len(person["face_keypoints_2d"]) in ((3 * face_points,) if face else (0,)) or person["face_keypoints_2d"] == []
        for part in person.values():
            xs, ys = np.array(part[0::3]), np.array(part[1::3])
            assert np.isfinite(xs).all() and np.isfinite(ys).all()
            if inside:  # DWPose's padded person crops may place points past the border; OpenPose's do not
                assert ((xs >= 0) & (xs <= w)).all() and ((ys >= 0) & (ys <= h)).all()
    return keypoints


@pytest.fixture(scope="module")
def dwpose_detector(dwpose) -> DWposeDetector:
    """controlnet-aux's DWposeDetector needs mmpose to build its estimator; given ours (same
    (keypoints, scores) contract), its own __call__ draws what DWPose users know."""
    detector = DWposeDetector.__new__(DWposeDetector)
    detector.pose_estimation = dwpose.estimator
    return detector


def test_dwpose_equals_controlnet_aux_drawing_on_our_onnx_estimator(dwpose, dwpose_detector):
    images = photos()
    maps, extras = dwpose.annotate_with_extras(images)
    for image, got, doc in zip(images, maps, extras):
        h, w = image.shape[:2]
        want = dwpose_detector(image, detect_resolution=min(h, w), image_resolution=min(h, w), output_type="np")
        assert got.shape == image.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        check_openpose_json(doc, h, w, hands=True, face=True, face_points=68, inside=False)
    assert any(m.any() for m in maps)  # something drawn, so the comparison compares something


DWPOSE_PARTS = {"pose_keypoints_2d": (0, 18), "face_keypoints_2d": (24, 92), "hand_left_keypoints_2d": (92, 113),
                "hand_right_keypoints_2d": (113, 134)}  # DWPose's 134 points, OpenPose's body order first


def test_dwpose_keypoints_are_the_estimators_points_in_pixels(dwpose, dwpose_detector, monkeypatch):
    """Two person boxes (the tiny detector finds none on these photos, so the test above sees only the
    whole-image box): two people, drawn as controlnet-aux draws them, and in the JSON every point the
    estimator scored >= 0.3 inside the image as [x, y, score] in pixels, any other as [0, 0, 0]."""
    image = photos()[1]
    h, w = image.shape[:2]
    boxes = np.array([[8, 6, 90, 120], [100, 20, 184, 110]], np.float32)
    monkeypatch.setattr(dwpose.estimator, "detect", lambda images: [boxes for _ in images])
    (got,), (doc,) = dwpose.annotate_with_extras([image])
    keypoints, scores = dwpose.estimator(np.ascontiguousarray(image[:, :, ::-1]))
    people = check_openpose_json(doc, h, w, hands=True, face=True, face_points=68, inside=False)["people"]
    assert len(people) == len(keypoints) == len(boxes)
    found = 0
    for person, points, score in zip(people, keypoints, scores):
        for part, (start, stop) in DWPOSE_PARTS.items():
            want = []
            for (x, y), c in zip(points[start:stop], score[start:stop]):
                want += [x, y, c] if c >= 0.3 and x >= 0 and y >= 0 else [0.0, 0.0, 0.0]
            np.testing.assert_allclose(person[part], want, atol=1e-3)
            found += sum(1 for c in person[part][2::3] if c > 0)
    assert found > 10  # points kept, so the comparison compares something
    want = dwpose_detector(image, detect_resolution=min(h, w), image_resolution=min(h, w), output_type="np")
    np.testing.assert_array_equal(got, want)


def test_dwpose_batch_equals_one_by_one(dwpose):
    images = [photo("astronaut", (100, 75)), photo("coffee", (90, 66))]
    maps, extras = dwpose.annotate_with_extras(images)
    for image, m, e in zip(images, maps, extras):
        one_map, one_extra = dwpose.annotate_with_extras([image])
        assert np.abs(one_map[0].astype(int) - m.astype(int)).max() == 0
        assert json.loads(one_extra[0]) == json.loads(e)


def test_dwpose_detector_post_processing():
    # YOLOX decoding: anchor 0 (stride 8, grid 0,0) with offset (1, 1) and log-size 0 -> 8 px box at (8, 8)
    raw = np.zeros((1, 8400, 85), np.float32)
    raw[0, 0, :4] = [1, 1, 0, 0]
    decoded = yolox_decode(raw)
    assert decoded[0, 0, :4].tolist() == [8, 8, 8, 8]
    assert decoded[0, 8399, :2].tolist() == [19 * 32, 19 * 32]  # last stride-32 anchor
    # person boxes: objectness x class-0 score, NMS at 0.45, kept above 0.3, scaled back by the ratio
    prediction = np.zeros((4, 85), np.float32)
    prediction[:, :4] = [[50, 50, 40, 80], [52, 50, 40, 80], [200, 200, 40, 40], [300, 300, 40, 40]]
    prediction[:, 4] = [0.9, 0.8, 0.9, 0.9]
    prediction[:, 5] = [0.9, 0.9, 0.2, 0.9]  # box 2 is not a person (0.18 < 0.3)
    boxes = person_boxes(prediction, ratio=2.0)
    np.testing.assert_allclose(sorted(boxes.tolist()), [[15, 5, 35, 45], [140, 140, 160, 160]])  # box 1 suppressed
    assert nms(np.array([[0, 0, 10, 10], [0, 0, 10, 10.0]]), np.array([0.5, 0.6]), 0.45) == [1]


def test_dwpose_onnx_graphs_run_in_one_batch(dwpose):
    # the tiny graphs have a dynamic batch axis, so a batch of images is one detector call
    assert isinstance(dwpose.estimator.det.get_inputs()[0].shape[0], str)
    assert isinstance(dwpose.estimator, Wholebody) and dwpose.estimator.pose_size == (288, 384)


@pytest.fixture(scope="module")
def openpose_detector(weights) -> OpenposeDetector:
    return OpenposeDetector.from_pretrained(weights["openpose_full"])  # controlnet-aux's own loader and files


@pytest.mark.parametrize("name", sorted(OPENPOSE))
def test_openpose_equals_controlnet_aux(weights, openpose_detector, name):
    ours = make(name, weights)
    detector = openpose_detector
    images = photos()[:2] if name == "openpose" else photos()[:1]  # ~3 s per image and network on a CPU
    maps, extras = ours.annotate_with_extras(images)
    for image, got, doc in zip(images, maps, extras):
        h, w = image.shape[:2]
        want = detector(image, detect_resolution=min(h, w), image_resolution=min(h, w), output_type="np", **OPENPOSE[name])
        assert got.shape == image.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        check_openpose_json(doc, h, w, OPENPOSE[name]["include_hand"], OPENPOSE[name]["include_face"], 70)


def test_openpose_keypoints_json_from_a_pose():
    """Normalised controlnet-aux poses -> OpenPose JSON in pixels; missing points are [0, 0, 0]."""
    full = ANNOTATORS["openpose_full"].__new__(ANNOTATORS["openpose_full"])
    body = [Keypoint(0.5, 0.25, 0.9, 0)] + [None] * 17
    hand = [Keypoint(0.1, 0.2)] + [Keypoint(-1 / 200, -1 / 100)] * 20  # controlnet-aux's "not found"
    face = [Keypoint(0.5, 0.5)] * 70
    pose = PoseResult(BodyResult(body, 1.0, 1), hand, None, face)
    canvas, doc = full.render([pose], 100, 200)
    person = json.loads(doc)["people"][0]
    assert person["pose_keypoints_2d"][:3] == [100.0, 25.0, 0.9]
    assert person["pose_keypoints_2d"][3:] == [0.0] * 51
    assert person["hand_left_keypoints_2d"][:6] == [20.0, 20.0, 1.0, 0.0, 0.0, 0.0]
    assert person["hand_right_keypoints_2d"] == []
    assert len(person["face_keypoints_2d"]) == 210
    assert canvas.shape == (100, 200, 3) and canvas.any()


def table(images: list[np.ndarray]) -> pa.Table:
    return pa.table({
        "source_uri": [f"mem://{i}" for i in range(len(images))],
        "image": [array_to_png(i) for i in images],
        "width": [i.shape[1] for i in images],
        "height": [i.shape[0] for i in images],
    })


def test_annotate_stage_adds_keypoints_only_for_pose_annotators(weights):
    images = [photo("astronaut", (100, 75)), photo("coffee", (90, 66))]
    pose = Annotate(AnnotatorConfig(name="dwpose", id="body"), resolve_model(weights["dwpose"], None, "yolox_l.onnx"))
    out = pose(table(images))
    assert {"control_body", "annotator_body", "keypoints_body"} <= set(out.column_names)
    for doc, image in zip(out.column("keypoints_body").to_pylist(), images):
        assert json.loads(doc)["canvas_width"] == image.shape[1]
    canny = Annotate(AnnotatorConfig(name="canny"), None)(table(images))
    assert not [c for c in canny.column_names if c.startswith("keypoints_")]
    assert json.loads(out.column("annotator_body")[0].as_py())["weights_file"] == "yolox_l.onnx,dw-ll_ucoco_384.onnx"


def test_run_session_loops_over_a_graph_with_a_fixed_batch_of_one(tmp_path):
    """DWPose's published graphs may have a fixed batch of 1: a stack then runs one item at a time."""
    import onnxruntime as ort
    import torch

    from pipeline.annotators.dwpose import run_session

    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 2, 3).eval()
    torch.onnx.export(net, (torch.rand(1, 3, 8, 8),), str(tmp_path / "fixed.onnx"), input_names=["x"], dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "fixed.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 1
    stack = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    (out,) = run_session(session, stack)
    with torch.no_grad():
        want = net(torch.from_numpy(stack)).numpy()
    assert out.shape == (3, 2, 6, 6)
    np.testing.assert_allclose(out, want, atol=1e-5)
