"""Tiny (or full-size, on request) random-weight checkpoints of every neural annotator, with its
real architecture, under the file names its loader expects: `write_annotators(dir, names)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from controlnet_aux.hed import ControlNetHED_Apache2


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def _save(build, wrap=lambda sd: sd):
    """A writer: build the network with a seed, torch.save its (wrapped) state_dict to a path."""
    return lambda path, seed: torch.save(wrap(_seeded(seed, build).state_dict()), path)


def _pidinet():
    from controlnet_aux.pidi.model import pidinet

    return pidinet()


def _teed():
    from controlnet_aux.teed.ted import TED

    return TED()


def _mlsd():
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    return MobileV2_MLSD_Large()


def _lineart():
    from controlnet_aux.lineart import Generator

    return Generator(3, 1, 3)


def _lineart_anime():
    import functools

    from controlnet_aux.lineart_anime import UnetGenerator
    from torch import nn

    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)


def _openpose_save(build_name: str):
    """OpenPose checkpoints hold the network's keys without their first component (controlnet-aux's
    util.transfer maps `model0.conv1_1.weight` to `conv1_1.weight`)."""

    def build():
        from controlnet_aux.open_pose import model

        return getattr(model, build_name)()

    return _save(build, lambda sd: {".".join(k.split(".")[1:]): v for k, v in sd.items()})


def _midas():
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    with torch.no_grad():  # random weights end in ReLU at ~0: lift the last conv so the depth map varies
        net.scratch.output_conv[4].bias.fill_(1.0)
    return net


def _normal_bae():
    import contextlib
    import io
    import types

    from controlnet_aux.normalbae.nets.NNET import NNET

    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    with contextlib.redirect_stdout(io.StringIO()):
        return NNET(args)


def _leres():
    from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel

    return RelDepthModel(backbone="resnext101")


def _leres_pix2pix():
    """The pix2pix merge network controlnet-aux's LeresDetector.from_pretrained always builds (its
    Pix2Pix4DepthModel's netG: unet_1024, no norm); only its boost uses it."""
    from controlnet_aux.leres.pix2pix.models import networks

    return networks.define_G(2, 1, 64, "unet_1024", "none", False, "normal", 0.02, [])


def _facenet():
    from controlnet_aux.open_pose.face import FaceNet

    return FaceNet()


class _TinyYoloxHead(torch.nn.Module):
    """Stand-in for DWPose's YOLOX-L ONNX graph (building YOLOX needs mmdet): the same input
    (batch, 3, 640, 640) BGR 0-255 and output (batch, 8400, 85) = per anchor on strides 8/16/32:
    box offsets, log sizes, sigmoid objectness and 80 sigmoid class scores. Random weights; only the
    stride-32 anchors score above zero, with large boxes, so that an image has a few person boxes."""

    def __init__(self):
        super().__init__()
        self.levels = torch.nn.ModuleList(torch.nn.Conv2d(3, 85, s, stride=s) for s in (8, 16, 32))

    def forward(self, x):
        x = x / 255.0 - 0.5
        out = torch.cat([level(x).flatten(2) for level in self.levels], 2).transpose(1, 2)
        coarse = torch.zeros_like(out[..., :1])
        coarse[:, -400:] = 1.0  # the 20 x 20 stride-32 anchors
        scores = torch.sigmoid(out[..., 4:] * 8 - 1.7 - 20 * (1 - coarse))
        return torch.cat([out[..., :2] * 0.1, out[..., 2:4] * 0.1 + 2.5, scores], -1)


class _TinyRTMPose(torch.nn.Module):
    """Stand-in for DWPose's RTMPose whole-body ONNX graph (building RTMPose needs mmpose): the same
    input (batch, 3, 384, 288), normalised BGR crop, and SimCC outputs simcc_x (batch, 133, 576)
    and simcc_y (batch, 133, 768)."""

    def __init__(self, keypoints: int = 133, h: int = 384, w: int = 288):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, stride=16), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, keypoints, 3, padding=1))
        self.x = torch.nn.Linear((h // 16) * (w // 16), w * 2)
        self.y = torch.nn.Linear((h // 16) * (w // 16), h * 2)

    def forward(self, crops):
        f = self.features(crops).flatten(2)
        return self.x(f), self.y(f)


def _onnx(build, shape, input_name: str, output_names: list[str]):
    def write(path: Path, seed: int) -> None:
        net = _seeded(seed, build).eval()
        axes = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in output_names}}
        torch.onnx.export(net, (torch.rand(*shape) * 255,), str(path), input_names=[input_name],
                          output_names=output_names, dynamic_axes=axes, dynamo=False)

    return write


# file name (lllyasviel/Annotators layout, or the default repo's) -> (writer(path, seed), approximate MB)
ANNOTATOR_FILES: dict[str, tuple] = {
    "ControlNetHED.pth": (_save(ControlNetHED_Apache2), 59),
    # the released PiDiNet checkpoint is a DataParallel training checkpoint: {"state_dict": {"module.<key>": ...}}
    "table5_pidinet.pth": (_save(_pidinet, lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}), 3),
    "5_model.pth": (_save(_teed), 0.3),
    "mlsd_large_512_fp32.pth": (_save(_mlsd), 6),
    "sk_model.pth": (_save(_lineart), 17),
    "sk_model2.pth": (_save(_lineart), 17),
    "netG.pth": (_save(_lineart_anime), 218),
    "body_pose_model.pth": (_openpose_save("bodypose_model"), 209),
    "hand_pose_model.pth": (_openpose_save("handpose_model"), 147),
    "facenet.pth": (_save(_facenet), 154),
    "dpt_hybrid-midas-501f0c75.pt": (_save(_midas), 493),
    # the released checkpoint is a training checkpoint: {"model": {"module.<key>": ...}}
    "scannet.pt": (_save(_normal_bae, lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}), 290),
    # the released LeReS checkpoint is a training checkpoint: {"depth_model": {"module.<key>": ...}}
    "res101.pth": (_save(_leres, lambda sd: {"depth_model": {f"module.{k}": v for k, v in sd.items()}}), 462),
    "latest_net_G.pth": (_save(_leres_pix2pix), 318),  # not loaded by depth_leres (no boost); for comparisons
    "yolox_l.onnx": (_onnx(_TinyYoloxHead, (1, 3, 640, 640), "images", ["output"]), 0.1),
    "dw-ll_ucoco_384.onnx": (_onnx(_TinyRTMPose, (1, 3, 384, 288), "input", ["simcc_x", "simcc_y"]), 10),
}


def _depth_anything(directory: Path, seed: int) -> None:
    """Depth Anything (small layout: DINOv2 backbone + DPT head), tiny widths, the real image processor."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(image_size=518, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)
    _quiet_transformers()
    _seeded(seed, lambda: DepthAnythingForDepthEstimation(config)).save_pretrained(directory, safe_serialization=True)
    DPTImageProcessor(do_resize=True, size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      resample=3, do_rescale=True, do_normalize=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225], do_pad=False).save_pretrained(directory)


def _zoedepth(directory: Path, seed: int) -> None:
    """ZoeDepth in the nyu-kitti layout (BEiT backbone with relative position bias, DPT neck, two metric heads
    chosen by a patch transformer), tiny widths, the real image processor settings. The patch transformer's
    width (128) and depth (4) are fixed by transformers' implementation. transformers' initialisation
    (normal, std 0.02) makes the random network's features vanish, so every depth is the same; conv and
    linear weights are re-drawn with fan-in scaling so that the depth map varies with the image."""
    from transformers import BeitConfig, ZoeDepthConfig, ZoeDepthForDepthEstimation, ZoeDepthImageProcessor

    backbone = BeitConfig(image_size=384, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                          intermediate_size=64, use_relative_position_bias=True, reshape_hidden_states=False,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = ZoeDepthConfig(
        backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, num_relative_features=8,
        bottleneck_features=16, bin_embedding_dim=8, num_attractors=[4, 4, 2, 1],
        bin_configurations=[{"name": "nyu", "n_bins": 8, "min_depth": 0.001, "max_depth": 10.0},
                            {"name": "kitti", "n_bins": 8, "min_depth": 0.001, "max_depth": 80.0}],
        num_patch_transformer_layers=4, patch_transformer_hidden_size=128, patch_transformer_intermediate_size=128,
        patch_transformer_num_attention_heads=4)

    def build():
        model = ZoeDepthForDepthEstimation(config)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                elif isinstance(module, torch.nn.ConvTranspose2d):
                    torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="linear")
        return model

    _quiet_transformers()
    _seeded(seed, build).save_pretrained(directory, safe_serialization=True)
    ZoeDepthImageProcessor(do_pad=True, do_resize=True, size={"height": 384, "width": 512}, keep_aspect_ratio=True,
                           ensure_multiple_of=32, resample=2, do_rescale=True, do_normalize=True,
                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(directory)


def _upernet(directory: Path, seed: int) -> None:
    """UperNet with a ConvNeXt backbone and 150 ADE20K classes, tiny widths, the real image processor."""
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32, auxiliary_channels=8,
                           num_labels=150, use_auxiliary_head=True)
    _quiet_transformers()
    _seeded(seed, lambda: UperNetForSemanticSegmentation(config)).save_pretrained(directory, safe_serialization=True)
    SegformerImageProcessor(do_resize=True, size={"height": 512, "width": 512}, do_reduce_labels=False).save_pretrained(directory)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar


# annotator -> (sub-directory of the annotators directory, writer(directory, seed)): whole save_pretrained models
ANNOTATOR_DIRS: dict[str, tuple] = {
    "depth_anything": ("depth-anything", _depth_anything),
    "seg_ade20k": ("upernet-ade20k", _upernet),
    "depth_zoe": ("zoedepth-nyu-kitti", _zoedepth),
}
# written only when asked for: full-size random checkpoints (see ANNOTATOR_FILES for sizes)
HEAVY = ("lineart_anime", "openpose", "openpose_hand", "openpose_face", "openpose_full", "depth_midas", "normal_bae",
         "depth_leres")


def annotator_names(names: Sequence[str] | str | None) -> list[str]:
    from pipeline.annotators import ANNOTATORS

    neural = [n for n, cls in ANNOTATORS.items() if cls.default_model]
    if names is None:
        return [n for n in neural if n not in HEAVY]
    if names == "all" or list(names) == ["all"]:
        return neural
    unknown = [n for n in names if n not in ANNOTATORS]
    if unknown:
        raise ValueError(f"unknown annotators {unknown}; known: {sorted(ANNOTATORS)}")
    return [n for n in names if n in neural]


def annotator_files(names: Sequence[str]) -> list[str]:
    """The weight files the given annotators load, in ANNOTATOR_FILES order."""
    from pipeline.annotators import ANNOTATORS

    wanted = {f for n in names if n not in ANNOTATOR_DIRS for f in ANNOTATORS[n].files}
    unknown = wanted - set(ANNOTATOR_FILES)
    if unknown:
        raise ValueError(f"no tiny writer for {sorted(unknown)}")
    return [f for f in ANNOTATOR_FILES if f in wanted]


def write_annotators(annotators_dir: str | Path, names: Sequence[str] | str | None = None, seed: int = 0,
                     skip_existing: bool = False) -> dict[str, str]:
    """Write random-weight checkpoints of the given annotators' real networks under the file names
    their loaders expect (plain tensors only, so torch.load(weights_only=True) reads them; transformers
    models with save_pretrained in a sub-directory); return {annotator: its weights directory}.
    A file's weights depend only on the seed and the file name."""
    annotators_dir = Path(annotators_dir)
    annotators_dir.mkdir(parents=True, exist_ok=True)
    names = annotator_names(names)
    for filename in annotator_files(names):
        writer, _ = ANNOTATOR_FILES[filename]
        path = annotators_dir / filename
        if skip_existing and path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path, seed + list(ANNOTATOR_FILES).index(filename))
    dirs = {}
    for name in names:
        if name in ANNOTATOR_DIRS:
            sub, writer = ANNOTATOR_DIRS[name]
            if not (skip_existing and (annotators_dir / sub / "config.json").is_file()):
                writer(annotators_dir / sub, seed)
            dirs[name] = str(annotators_dir / sub)
        else:
            dirs[name] = str(annotators_dir)
    return dirs

