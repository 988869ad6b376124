"""Depth, near = bright: MiDaS and LeReS (controlnet-aux networks), Depth Anything and ZoeDepth (transformers).

depth_zoe runs transformers' ZoeDepth, not controlnet-aux's, whose loader accepts only the BEiT-L MiDaS
configuration (about 1.3 GB of weights); it draws the depth as controlnet-aux's ZoeDetector does.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
from pydantic import Field, model_validator

from pipeline.annotators.base import NeuralAnnotator, Params, TransformersAnnotator, hwc3, register


@register
class DepthMidas(NeuralAnnotator):
    name = "depth_midas"
    description = "MiDaS DPT-Hybrid relative depth (controlnet-aux MidasDetector), near = bright."
    default_model = "lllyasviel/Annotators"
    files = ("dpt_hybrid-midas-501f0c75.pt",)
    pad_multiple = 32
    size = ("network input reflect-padded at bottom/right to multiples of 32, depth cropped back, "
            "then min-max normalised over the image")

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.midas import MidasDetector

        self.network = MidasDetector.from_pretrained(weights_dir, filename=self.files[0]).model.to(self.device).eval()

    def forward(self, stack: np.ndarray):
        return self.network(self.tensor(stack) / 127.5 - 1.0).float()

    def draw(self, d) -> np.ndarray:
        """controlnet-aux's normalisation, per image, in torch."""
        torch = self._torch
        d = d - torch.min(d)
        d = d / torch.max(d)
        return hwc3((d.cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8))


@register
class DepthLeres(NeuralAnnotator):
    """controlnet-aux's LeReS depth network (RelDepthModel, ResNeXt-101) without boost.

    controlnet-aux's LeresDetector.from_pretrained also builds the pix2pix merge network used only by
    boost, parsing its options from the process's command line (argparse on sys.argv, in a Ray
    worker or under pytest whatever that holds) and setting torch.backends.cudnn.benchmark globally.
    boost is not offered here, so the depth network is loaded on its own, as controlnet-aux loads it
    (weights_only), and neither latest_net_G.pth nor the pix2pix options are touched.

    controlnet-aux (like sd-webui-controlnet) never puts the depth network in eval mode, so its
    BatchNorm layers normalise with the statistics of the one image they are given (and update their
    running statistics, which are then never used). The maps ControlNet users know come from that;
    here each BatchNorm normalises every image of a batch with that image's own statistics (instance
    normalisation with the BatchNorm's affine weights), which equals controlnet-aux image by image,
    batches, and leaves the running statistics alone."""

    name = "depth_leres"
    description = "LeReS relative depth (controlnet-aux LeresDetector, boost off), near = bright."
    default_model = "lllyasviel/Annotators"
    files = ("res101.pth",)
    pad_multiple = 32
    MEAN: ClassVar[tuple[float, ...]] = (0.485, 0.456, 0.406)
    STD: ClassVar[tuple[float, ...]] = (0.229, 0.224, 0.225)
    size = ("network input reflect-padded at bottom/right to multiples of 32 (controlnet-aux runs it at its "
            "detect resolution, multiples of 64), depth cropped back, then min-max normalised over the image; "
            "BatchNorm with each image's own statistics, as controlnet-aux runs it")

    class Params(Params):
        thr_a: float = Field(0.0, ge=0, le=100, description="Remove near: zero the depth below this percent of 255 "
                                                          "(before inverting); 0: off.")
        thr_b: float = Field(0.0, ge=0, le=100, description="Remove background: zero the inverted depth below this "
                                                          "percent of 255; 0: off.")
        boost: bool = Field(False, description="Only false: controlnet-aux's boost (pix2pix merge of several "
                                               "resolutions) is not offered.")

        @model_validator(mode="after")
        def _no_boost(self):
            if self.boost:
                raise ValueError("boost is not offered (controlnet-aux's pix2pix merge network is not loaded)")
            return self

    def load(self, weights_dir: str) -> None:
        from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel
        from controlnet_aux.leres.leres.net_tools import strip_prefix_if_present

        torch = self._torch
        checkpoint = torch.load(Path(weights_dir) / self.files[0], map_location="cpu", weights_only=True)
        model = RelDepthModel(backbone="resnext101")
        model.load_state_dict(strip_prefix_if_present(checkpoint["depth_model"], "module."), strict=True)
        self.network = model.depth_model.to(self.device).eval()
        for module in self.network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.forward = functools.partial(_batch_norm_per_image, module)

    def forward(self, stack: np.ndarray) -> np.ndarray:
        """controlnet-aux's estimateleres: BGR, ImageNet mean/std on 0-255 values (its float ToTensor
        does not rescale)."""
        torch = self._torch
        mean = torch.tensor(self.MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.STD, device=self.device).view(1, 3, 1, 1)
        return self.network((self.tensor(stack[..., ::-1]) - mean) / std)[:, 0].float().cpu().numpy()

    def draw(self, depth: np.ndarray) -> np.ndarray:
        """LeresDetector.__call__ after its estimate: 16-bit min-max, 8 bit, thresholds, inverted (near = bright)."""
        depth_min, depth_max = depth.min(), depth.max()
        max_val = (2 ** 16) - 1
        if depth_max - depth_min > np.finfo("float").eps:
            out = max_val * (depth - depth_min) / (depth_max - depth_min)
        else:
            out = np.zeros(depth.shape)
        image = cv2.convertScaleAbs(out.astype("uint16"), alpha=(255.0 / 65535.0))
        if self.params.thr_a != 0:
            image = cv2.threshold(image, (self.params.thr_a / 100) * 255, 255, cv2.THRESH_TOZERO)[1]
        image = cv2.bitwise_not(image)
        if self.params.thr_b != 0:
            image = cv2.threshold(image, (self.params.thr_b / 100) * 255, 255, cv2.THRESH_TOZERO)[1]
        return hwc3(image)


def _batch_norm_per_image(bn, x):
    """A BatchNorm2d in training mode given one image at a time, for a whole batch: each image normalised
    with its own per-channel statistics, then the BatchNorm's affine transform; running statistics untouched."""
    import torch

    return torch.nn.functional.instance_norm(x, weight=bn.weight, bias=bn.bias, use_input_stats=True, eps=bn.eps)


@register
class DepthAnything(TransformersAnnotator):
    name = "depth_anything"
    description = "Depth Anything relative depth (transformers DepthAnythingForDepthEstimation), near = bright."
    default_model = "LiheYoung/depth-anything-small-hf"
    model_class = "DepthAnythingForDepthEstimation"
    size = ("network input resized by the model's image processor (short side 518, aspect kept, multiples of 14), "
            "depth resized (bilinear) back to the image's size")

    def forward(self, stack: np.ndarray) -> np.ndarray:
        torch = self._torch
        depth = self.network(pixel_values=self.pixel_values(stack)).predicted_depth
        depth = torch.nn.functional.interpolate(depth[:, None].float(), stack.shape[1:3], mode="bilinear",
                                                align_corners=False)[:, 0]
        return depth.cpu().numpy()

    def draw(self, d: np.ndarray) -> np.ndarray:
        """Min-max per image, as ControlNet's depth_anything does."""
        d = d.astype(np.float64)
        d = (d - d.min()) / max(d.max() - d.min(), 1e-12) * 255.0
        return hwc3(d.clip(0, 255).astype(np.uint8))


@register
class DepthZoe(TransformersAnnotator):
    name = "depth_zoe"
    description = ("ZoeDepth metric depth (transformers ZoeDepthForDepthEstimation), drawn as controlnet-aux's "
                   "ZoeDetector does: near = bright.")
    default_model = "Intel/zoedepth-nyu-kitti"
    model_class = "ZoeDepthForDepthEstimation"
    size = ("network input reflect-padded and resized by the model's image processor (aspect kept, multiples of 32), "
            "depth resized (bicubic) back and the padding cropped by its post-processing, at the image's size; "
            "then normalised between its 2nd and 85th percentiles per image")

    class Params(Params):
        gamma_corrected: bool = Field(False, description="Raise the normalised depth to the power 2.2 "
                                                         "(controlnet-aux).")

    def forward(self, stack: np.ndarray) -> list[np.ndarray]:
        """Metric depth at the image's size. A model with several metric heads (nyu-kitti) picks one head per
        forward pass by a vote over the whole batch, so images whose own choice differs from the vote are run
        again on their own group: every image gets the head it would get alone."""
        torch = self._torch
        h, w = stack.shape[1:3]
        outputs = self.network(pixel_values=self.pixel_values(stack))
        depths = self.processor.post_process_depth_estimation(outputs, source_sizes=[(h, w)] * len(stack))
        depths = [d["predicted_depth"].float().cpu().numpy().astype(np.float64) for d in depths]
        logits = outputs.domain_logits
        if logits is not None and len(stack) > 1:
            chosen = int(torch.argmax(logits.sum(dim=0)))
            own = torch.argmax(logits, dim=-1).tolist()
            other = [i for i, c in enumerate(own) if c != chosen]
            if other:
                for i, d in zip(other, self.forward(stack[other])):
                    depths[i] = d
        return depths

    def draw(self, depth: np.ndarray) -> np.ndarray:
        """controlnet-aux's ZoeDetector post-processing: 2nd/85th percentiles to 1/0 (near = bright)."""
        vmin, vmax = np.percentile(depth, 2), np.percentile(depth, 85)
        depth = 1.0 - (depth - vmin) / max(vmax - vmin, 1e-12)
        if self.params.gamma_corrected:  # clipped first: controlnet-aux's power of a negative is nan, cast to 0
            depth = np.power(depth.clip(0, 1), 2.2)
        return hwc3((depth * 255.0).clip(0, 255).astype(np.uint8))
