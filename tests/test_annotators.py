"""Annotators on real photographs: size kept, deterministic, batch == one by one, provenance, and
equal to controlnet-aux's own call on the same image and weights.

Neural annotators load random-weight checkpoints written by pipeline.testing with the real
architectures, through the real loaders (controlnet-aux's from_pretrained, transformers'
from_pretrained, onnxruntime)."""

import os
import warnings

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import controlnet_aux
    from controlnet_aux import (
        CannyDetector,
        ContentShuffleDetector,
        HEDdetector,
        LineartDetector,
        MLSDdetector,
        PidiNetDetector,
    )
    from controlnet_aux.lineart_standard import LineartStandardDetector
    from controlnet_aux.teed import TEEDdetector

from pipeline.annotators import ANNOTATORS, image_seed
from pipeline.models import file_sha256, resolve_model
from tests.helpers import photo

NEURAL = sorted(n for n, c in ANNOTATORS.items() if c.default_model)


def photos(size=(192, 128)) -> list[np.ndarray]:
    """Real photographs at a size whose sides are multiples of 64 (so controlnet-aux does not resize)."""
    return [photo(n, size) for n in ("astronaut", "coffee")]


def odd_photos() -> list[np.ndarray]:
    """Two shapes in one batch, neither a multiple of 64 (nor of 16)."""
    return [photo("astronaut", (100, 75)), photo("coffee", (90, 66)), photo("chelsea", (100, 75))]


class Weights:
    """weights[name]: the directory of an annotator's tiny checkpoints (written on first use)."""

    def __init__(self, get):
        self.get = get

    def __getitem__(self, name: str) -> str:
        return self.get(name)


@pytest.fixture(scope="module")
def weights(annotator_weights) -> Weights:
    return Weights(annotator_weights)


def make(name: str, weights: Weights, params: dict | None = None):
    cls = ANNOTATORS[name]
    model = resolve_model(weights[name], None, cls.files[0]) if cls.default_model else None
    return cls(params or {}, model=model)


@pytest.fixture(scope="module")
def annotators(weights):
    cache = {}

    def get(name: str, params: dict | None = None):
        key = (name, tuple(sorted((params or {}).items())))
        if key not in cache:
            cache[key] = make(name, weights, params)
        return cache[key]

    return get


# The hand and face OpenPose variants run the same body network as `openpose` and, per detected
# person, the hand/face networks; tests/test_pose.py checks each against controlnet-aux.
GENERIC = sorted(set(ANNOTATORS) - {"openpose_hand", "openpose_face", "openpose_full"})


@pytest.mark.parametrize("name", GENERIC)
def test_size_dtype_determinism_and_batching(annotators, name):
    annotator = annotators(name)
    images = odd_photos()
    batched = annotator.annotate(images)
    assert len(batched) == len(images)
    for image, out in zip(images, batched):
        assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(annotator.annotate(images[1:2])[0], annotator.annotate(images[1:2])[0])  # deterministic
    for image, out in zip(images, batched):
        one = annotator.annotate([image])[0]
        # Neural nets: a batched convolution may pick another kernel than a single-image one, so
        # float sums can differ in the last bit and move a pixel by one level; nothing more.
        tolerance = 1 if annotator.default_model else 0
        assert np.abs(one.astype(int) - out.astype(int)).max() <= tolerance


@pytest.mark.parametrize("name", NEURAL)
def test_provenance_names_weights_with_their_sha256(annotators, weights, name):
    annotator = annotators(name)
    prov = annotator.provenance()
    directory = weights[name]
    files = ANNOTATORS[name].files
    assert prov["name"] == name and prov["params"] == annotator.params.model_dump()
    assert prov["model"] == directory and prov["revision"].startswith("sha256:")
    assert prov["weights_file"].split(",") == list(files)
    assert prov["weights_sha256"].split(",") == [file_sha256(f"{directory}/{f}") for f in files]
    assert prov["package"].split("==")[0] in ("controlnet-aux", "transformers", "onnxruntime")
    assert prov["size_policy"]


def test_weight_free_provenance():
    for name in ("canny", "scribble_xdog", "shuffle", "binary"):
        prov = ANNOTATORS[name]({}).provenance()
        assert prov["name"] == name and prov["package"].startswith("opencv==") and "model" not in prov
    assert ANNOTATORS["canny"]({}).provenance()["params"] == {"low_threshold": 100, "high_threshold": 200}


@pytest.mark.parametrize(
    ("name", "params", "error"),
    [
        ("canny", {"low_threshold": 200, "high_threshold": 100}, "must not exceed"),
        ("teed", {"safe_steps": -1}, "safe_steps"),
        ("hed_safe", {"safe": False}, "safe"),
        ("tile", {"downsample": 0.5}, "downsample"),
        ("mlsd", {"thr_v": "high"}, "thr_v"),
        ("color", {"colour": 3}, "colour"),
    ],
)
def test_bad_params_are_rejected_by_name(name, params, error):
    with pytest.raises(ValidationError, match=error):
        ANNOTATORS[name].Params(**params)


def test_neural_base_groups_by_shape_pads_and_crops_back():
    """What a NeuralAnnotator's forward and draw are given: one padded stack per shape, and each
    image's output cropped back to its size; the maps come back in input order."""
    import torch

    from pipeline.annotators.base import NeuralAnnotator, hwc3

    seen = []

    class Red(NeuralAnnotator):
        name = "red"
        pad_multiple = 16

        def forward(self, stack):
            seen.append(stack.shape)
            return self.tensor(stack)[:, 0]

        def draw(self, red):
            return hwc3(red.numpy().astype(np.uint8))

    red = Red.__new__(Red)  # no weights to load
    red._torch, red.device = torch, "cpu"
    images = odd_photos()  # 100x75, 90x66, 100x75
    maps = red.annotate(images)
    assert seen == [(2, 80, 112, 3), (1, 80, 96, 3)]
    for image, got in zip(images, maps):
        np.testing.assert_array_equal(got, hwc3(image[:, :, 0]))


def test_neural_annotator_without_weights_says_which():
    with pytest.raises(ValueError, match="needs weights"):
        ANNOTATORS["pidinet"]({}, model=None)


def test_tiny_checkpoints_load_with_weights_only(weights):
    import torch

    for name in NEURAL:
        for f in ANNOTATORS[name].files:
            if f.endswith((".pth", ".pt")):
                torch.load(f"{weights[name]}/{f}", map_location="cpu", weights_only=True)


# --- equal to controlnet-aux's own call (sides multiples of 64, detect/image resolution = the size) ---

RES = {"detect_resolution": 128, "image_resolution": 128, "output_type": "np"}


def assert_same(ours: list[np.ndarray], theirs: list[np.ndarray], tolerance: int = 0):
    for got, want in zip(ours, theirs):
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= tolerance


def test_canny_equals_controlnet_aux():
    ours = ANNOTATORS["canny"]({"low_threshold": 80, "high_threshold": 160}).annotate(photos())
    theirs = [CannyDetector()(i, low_threshold=80, high_threshold=160, detect_resolution=128, image_resolution=128)
              for i in photos()]
    assert_same(ours, theirs)
    assert 0 < (ours[0] > 0).mean() < 0.5  # edges, not a blank or full map


@pytest.mark.parametrize(("name", "kwargs"), [("hed", {}), ("hed_safe", {"safe": True}), ("scribble_hed", {"scribble": True})])
def test_hed_family_equals_controlnet_aux(annotators, weights, name, kwargs):
    detector = HEDdetector.from_pretrained(weights["hed"])
    # batched float maths, and on CPU weights prepacked for oneDNN, may differ from controlnet-aux's forward in the last bit
    assert_same(annotators(name).annotate(photos()), [detector(i, **RES, **kwargs) for i in photos()], tolerance=1)
    assert annotators(name).prepacked == torch.backends.mkldnn.is_available()  # weights in oneDNN's layout


def test_prepacked_convolutions_compute_what_torch_does():
    from pipeline.annotators.onednn import PrepackedConv2d, prepack_convolutions

    torch.manual_seed(0)
    shapes = [{}, {"groups": 8, "stride": 2}, {"dilation": 2, "padding": 2}, {"kernel_size": 1, "padding": 0, "bias": False}]
    inputs = [torch.randn(2, 16, 21, 30), torch.randn(1, 16, 8, 9), torch.randn(3, 16, 21, 30), torch.randn(1, 16, 16, 16)]
    for shape in shapes:
        conv = torch.nn.Conv2d(16, 16, **({"kernel_size": 3, "padding": 1} | shape)).eval()
        prepacked = PrepackedConv2d(conv)
        with torch.inference_mode():
            for x in inputs:
                torch.testing.assert_close(prepacked(x), conv(x), rtol=1e-5, atol=1e-5)
        # the weights are reordered for each input shape (any batch size); those of the last two shapes are kept
        assert list(prepacked.packed) == [(16, 21, 30), (16, 16, 16)]
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding="same"), torch.nn.Conv2d(4, 4, 3, padding=1))
    assert prepack_convolutions(net) == torch.backends.mkldnn.is_available()
    assert type(net[0]) is torch.nn.Conv2d  # padding given as a word: left as it is
    assert type(net[1]) is (PrepackedConv2d if torch.backends.mkldnn.is_available() else torch.nn.Conv2d)


def test_without_the_prepacking_ops_an_annotator_keeps_torchs_convolutions(weights, monkeypatch):
    def missing(*args, **kwargs):
        raise RuntimeError("mkldnn::_convolution_pointwise: not for this CPU")

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", missing)
    hed = make("hed", weights)
    assert not hed.prepacked and type(hed.network.block1.convs[0]) is torch.nn.Conv2d
    assert hed.annotate(photos())[0].shape == (128, 192, 3)


@pytest.mark.parametrize(
    ("name", "params", "kwargs"),
    [
        ("pidinet", {}, {}),
        ("pidinet", {"apply_filter": True}, {"apply_filter": True}),
        ("pidinet_safe", {}, {"safe": True}),
        ("scribble_pidinet", {}, {"scribble": True}),
    ],
)
def test_pidinet_family_equals_controlnet_aux(annotators, weights, name, params, kwargs):
    detector = PidiNetDetector.from_pretrained(weights["pidinet"])
    assert_same(annotators(name, params).annotate(photos()), [detector(i, **RES, **kwargs) for i in photos()], tolerance=1)


def test_teed_equals_controlnet_aux(annotators, weights):
    detector = TEEDdetector.from_pretrained(weights["teed"], filename="5_model.pth")
    theirs = [detector(i, detect_resolution=128, safe_steps=2, output_type="np") for i in photos()]
    assert_same(annotators("teed").annotate(photos()), theirs, tolerance=1)
    assert annotators("teed").prepacked == torch.backends.mkldnn.is_available()


def test_mlsd_equals_controlnet_aux(annotators, weights):
    detector = MLSDdetector.from_pretrained(weights["mlsd"])
    params = {"thr_v": 0.1, "thr_d": 0.05}
    theirs = [detector(i, **RES, **params) for i in photos()]
    ours = annotators("mlsd", params).annotate(photos())
    assert_same(ours, theirs)
    assert any(o.any() for o in ours)  # some lines drawn, so the comparison compares something


@pytest.mark.parametrize(("name", "coarse"), [("lineart", False), ("lineart_coarse", True)])
def test_lineart_equals_controlnet_aux(annotators, weights, name, coarse):
    detector = LineartDetector.from_pretrained(weights["lineart"])
    assert_same(annotators(name).annotate(photos()), [detector(i, coarse=coarse, **RES) for i in photos()], tolerance=1)


def test_lineart_anime_equals_controlnet_aux(annotators, weights):
    detector = controlnet_aux.LineartAnimeDetector.from_pretrained(weights["lineart_anime"])
    images = photos((128, 64))  # one 256x256 forward pass per image
    theirs = [detector(i, detect_resolution=64, image_resolution=64, output_type="np") for i in images]
    assert_same(annotators("lineart_anime").annotate(images), theirs, tolerance=1)


def test_lineart_standard_equals_controlnet_aux():
    theirs = [LineartStandardDetector()(i, guassian_sigma=6.0, intensity_threshold=8, detect_resolution=128,
                                        output_type="np") for i in photos()]
    assert_same(ANNOTATORS["lineart_standard"]({}).annotate(photos()), theirs)


def test_shuffle_equals_controlnet_aux_with_the_same_random_state():
    shuffle = ANNOTATORS["shuffle"]({"seed": 3})
    ours = shuffle.annotate(photos())
    theirs = []
    for image in photos():
        np.random.seed(image_seed(3, image))
        theirs.append(ContentShuffleDetector()(image, **RES))
    assert_same(ours, theirs)
    assert not np.array_equal(ours[0], photos()[0])
    other = ANNOTATORS["shuffle"]({"seed": 4}).annotate(photos()[:1])[0]
    assert not np.array_equal(other, ours[0])  # the seed matters


# --- weight-free annotators controlnet-aux does not have: their defining properties ---


def test_scribble_xdog_is_a_sparse_binary_map():
    out = ANNOTATORS["scribble_xdog"]({}).annotate(photos())
    for o in out:
        assert set(np.unique(o)) <= {0, 255}
        assert 0.01 < (o > 0).mean() < 0.6
    fewer = ANNOTATORS["scribble_xdog"]({"threshold": 128}).annotate(photos())
    assert (fewer[0] > 0).sum() < (out[0] > 0).sum()


def test_tile_downsamples_and_blurs():
    image = photos()[0]
    assert np.array_equal(ANNOTATORS["tile"]({"downsample": 1.0}).annotate([image])[0], image)
    tile = ANNOTATORS["tile"]({"downsample": 4.0}).annotate([image])[0]
    blurred = ANNOTATORS["tile"]({"downsample": 4.0, "blur_sigma": 2.0}).annotate([image])[0]
    detail = lambda x: np.abs(np.diff(x.astype(int), axis=1)).mean()  # noqa: E731
    assert detail(blurred) < detail(tile) < detail(image)
    assert np.abs(tile.astype(int) - image.astype(int)).mean() < 30  # still the same picture


def test_color_is_a_grid_of_flat_cells():
    image = photos()[0]  # 192 x 128
    grid = ANNOTATORS["color"]({"cell": 32}).annotate([image])[0]
    cells = grid.reshape(4, 32, 6, 32, 3)
    assert (cells == cells[:, :1, :, :1]).all()  # every cell one colour
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 4


def test_binary_thresholds():
    image = photos()[0]
    fixed = ANNOTATORS["binary"]({"threshold": 128}).annotate([image])[0]
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(fixed[:, :, 0], np.where(gray > 128, 0, 255))
    otsu = ANNOTATORS["binary"]({}).annotate([image])[0]
    assert set(np.unique(otsu)) == {0, 255}


def test_depth_midas_equals_controlnet_aux(annotators, weights):
    detector = controlnet_aux.MidasDetector.from_pretrained(weights["depth_midas"])
    ours = annotators("depth_midas").annotate(photos())
    assert_same(ours, [detector(i, **RES) for i in photos()], tolerance=1)
    assert ours[0].min() == 0 and ours[0].max() == 255  # normalised per image


def test_normal_bae_equals_controlnet_aux(annotators, weights):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = controlnet_aux.NormalBaeDetector.from_pretrained(weights["normal_bae"])
    ours = annotators("normal_bae").annotate(photos())
    assert_same(ours, [detector(i, **RES) for i in photos()], tolerance=1)
    assert len(np.unique(ours[0].reshape(-1, 3), axis=0)) > 10  # not a flat map


def test_depth_leres_equals_controlnet_aux(annotators, weights, monkeypatch):
    import copy
    import sys

    from controlnet_aux.leres import LeresDetector

    from pipeline.testing.annotators import ANNOTATOR_FILES

    directory = weights["depth_leres"]
    pix2pix = f"{directory}/latest_net_G.pth"  # controlnet-aux's loader always builds and loads it
    if not os.path.exists(pix2pix):
        ANNOTATOR_FILES["latest_net_G.pth"][0](pix2pix, 0)
    # its loader parses the pix2pix options from sys.argv (here pytest's); give it an empty command line
    monkeypatch.setattr(sys, "argv", ["leres"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = LeresDetector.from_pretrained(directory)
    annotator = annotators("depth_leres")
    ours = annotator.annotate(photos())
    assert_same(ours, [detector(i, **RES) for i in photos()], tolerance=1)
    assert len(np.unique(ours[0])) > 100  # a depth map, not a flat one
    thresholded = copy.copy(annotator)  # the same network, other thresholds
    thresholded.params = annotator.Params(thr_a=20, thr_b=30)
    theirs = [detector(i, thr_a=20, thr_b=30, **RES) for i in photos()]
    assert_same(thresholded.annotate(photos()), theirs, tolerance=1)
    with pytest.raises(ValidationError, match="boost"):
        annotator.Params(boost=True)


# --- transformers models: our batched call equals the model's own processor + forward, one image at a time ---


def test_depth_anything_equals_its_processor_and_model(annotators, weights):
    import torch
    from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(weights["depth_anything"])
    model = DepthAnythingForDepthEstimation.from_pretrained(weights["depth_anything"]).eval()
    images = odd_photos()
    ours = annotators("depth_anything").annotate(images)
    for image, got in zip(images, ours):
        with torch.no_grad():
            depth = model(**processor(images=image, return_tensors="pt")).predicted_depth
        depth = torch.nn.functional.interpolate(depth[None], image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
        depth = depth.numpy().astype(np.float64)
        want = ((depth - depth.min()) / (depth.max() - depth.min()) * 255.0).astype(np.uint8)
        assert np.abs(got[:, :, 0].astype(int) - want).max() <= 1
        assert got.min() == 0 and got.max() == 255  # min-max normalised per image


def zoe_draw(depth: np.ndarray) -> np.ndarray:
    """controlnet-aux's ZoeDetector post-processing of a depth map (controlnet_aux/zoe/__init__.py)."""
    vmin, vmax = np.percentile(depth, 2), np.percentile(depth, 85)
    depth = 1.0 - (depth - vmin) / (vmax - vmin)
    return (depth * 255.0).clip(0, 255).astype(np.uint8)


def test_depth_zoe_equals_its_processor_and_model(annotators, weights):
    import torch
    from transformers import AutoImageProcessor, ZoeDepthForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(weights["depth_zoe"])
    model = ZoeDepthForDepthEstimation.from_pretrained(weights["depth_zoe"]).eval()
    images = odd_photos()
    ours = annotators("depth_zoe").annotate(images)
    for image, got in zip(images, ours):
        with torch.no_grad():
            outputs = model(**processor(images=image, return_tensors="pt"))
        depth = processor.post_process_depth_estimation(outputs, source_sizes=[image.shape[:2]])[0]["predicted_depth"]
        want = zoe_draw(depth.numpy().astype(np.float64))
        assert np.abs(got[:, :, 0].astype(int) - want).max() <= 1
        assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 100  # a depth map, not a flat one
    gamma = annotators("depth_zoe", {"gamma_corrected": True}).annotate(images[:1])[0]
    expected = (np.power(ours[0].astype(np.float64) / 255.0, 2.2) * 255.0).astype(np.uint8)
    assert np.abs(gamma.astype(int) - expected).max() <= 2 and not np.array_equal(gamma, ours[0])


def test_depth_zoe_gives_each_image_of_a_batch_the_metric_head_it_gets_alone(weights):
    """nyu-kitti ZoeDepth picks one metric head per forward pass by a vote over the batch: make two images
    of one shape choose different heads, and check the batched call still equals one image at a time."""
    import torch

    annotator = make("depth_zoe", weights)  # its own copy: the classifier is changed below
    images = [odd_photos()[0], odd_photos()[2]]  # the same shape
    classifier = annotator.network.metric_head.mlp_classifier
    seen = []
    hook = classifier.linear2.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()))
    annotator.annotate([images[0]]), annotator.annotate([images[1]])
    hook.remove()
    with torch.no_grad():  # logits (+s, -s) with s > 0 for the first image, s < 0 for the second
        direction = seen[0][0] - seen[1][0]
        offset = -float(direction @ (seen[0][0] + seen[1][0])) / 2
        classifier.linear2.weight.copy_(torch.stack([direction, -direction]))
        classifier.linear2.bias.copy_(torch.tensor([offset, -offset]))
        pixel_values = annotator.pixel_values(images)
        heads = [int(torch.argmax(annotator.network(pixel_values=pixel_values[i : i + 1]).domain_logits)) for i in (0, 1)]
        assert heads == [0, 1]
        batch_depth = annotator.network(pixel_values=pixel_values).predicted_depth  # one head for both
        alone_depth = torch.cat([annotator.network(pixel_values=pixel_values[i : i + 1]).predicted_depth for i in (0, 1)])
    assert not torch.allclose(batch_depth, alone_depth)  # so the check below can fail
    one_by_one = [annotator.annotate([image])[0] for image in images]
    assert_same(annotator.annotate(images), one_by_one, tolerance=1)


def test_seg_ade20k_draws_classes_in_the_ade20k_palette(annotators, weights):
    import torch
    from controlnet_aux.util import ade_palette
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    processor = AutoImageProcessor.from_pretrained(weights["seg_ade20k"])
    model = UperNetForSemanticSegmentation.from_pretrained(weights["seg_ade20k"]).eval()
    palette = np.array(ade_palette(), dtype=np.uint8)
    image = odd_photos()[0]
    got = annotators("seg_ade20k").annotate([image])[0]
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0].numpy()
    np.testing.assert_array_equal(got, palette[labels])
    colours = {tuple(c) for c in got.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in palette}


class NotATensor:
    """Any pickled object other than tensors and containers: weights_only loading must refuse it."""


def test_checkpoints_load_weights_only(tmp_path):
    import pickle

    import torch

    torch.save({"norm": NotATensor()}, tmp_path / "ControlNetHED.pth")
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        make("hed", {"hed": str(tmp_path)})


def test_an_annotator_process_imports_only_the_controlnet_aux_modules_it_uses():
    """controlnet_aux's __init__ imports every detector (timm, segment-anything, ...); an annotator actor
    imports its own module alone, and the package's top-level names still work when asked for."""
    import subprocess
    import sys

    code = ("import sys; import pipeline.annotators; from controlnet_aux.hed import HEDdetector; "
            "print(sorted(m for m in sys.modules if m.startswith('controlnet_aux'))); "
            "from controlnet_aux import HEDdetector as top, CannyDetector; print(top is HEDdetector, "
            "'controlnet_aux.segment_anything' in sys.modules)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    alone, whole = out.stdout.splitlines()
    assert eval(alone) == ["controlnet_aux", "controlnet_aux.hed", "controlnet_aux.util"]
    assert whole == "True True"
