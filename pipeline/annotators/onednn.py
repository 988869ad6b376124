"""Convolutions with their weights prepacked for oneDNN, for annotator networks on CPU.

torch runs a float32 convolution on CPU through oneDNN, which wants the weights in a blocked layout of its
own: an eager `torch.nn.Conv2d` reorders its weights into that layout on every call. For a network of many
convolutions run on small images the reorders are a good part of the time: on one thread, per 128x192 image,
HED 0.164 -> 0.141 s and TEED 0.018 -> 0.015 s with the weights reordered once (HED at 256x384 0.608 -> 0.553 s).
Not every network gains: controlnet-aux's line-art generator ran 6% slower, so annotators opt in
(`NeuralAnnotator.prepack`). The op used is the one torch's inductor emits for frozen CPU convolutions: dense
tensors in and out, so a network's own forward runs unchanged. oneDNN may sum in another order: within one level
of the eager maps (tested against controlnet-aux).

The layout oneDNN picks depends on the input's shape, so the weights are reordered for each input shape, and
those of the last `PrepackedConv2d.KEEP` shapes kept. Weights reordered without a shape (as they once were
here) suit some shapes only: on an AVX2 CPU a 512-channel convolution of an 8x9 map took 198 ms with them
against 8.6 ms eager and 5.3 ms with weights reordered for that shape, and HED over photos of the usual
aspect ratios at 128 px took 0.50 s per image against 0.25 s eager and 0.21 s reordered per shape.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrepackedConv2d(torch.nn.Module):
    """The forward of a `torch.nn.Conv2d` (zero padding, explicit padding sizes) with its weight reordered once
    per input shape, for the last KEEP shapes (a run's photos mostly come in a few sizes; another shape costs one
    reorder, as an eager call does every time). The batch size is not part of the shape here: weights reordered
    for one image ran batches of 2-8 as fast as their own (measured)."""

    KEEP = 2

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.weight = conv.weight.detach()
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.packed: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()  # (C, H, W) -> weight, oldest first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[1:])
        weight = self.packed.pop(shape, None)
        if weight is None:
            weight = torch.ops.mkldnn._reorder_convolution_weight(self.weight, *self.args, [1, *shape])
            while len(self.packed) >= self.KEEP:
                self.packed.popitem(last=False)
        self.packed[shape] = weight
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *self.args, "none", [], "")


def prepackable(module: torch.nn.Module) -> bool:
    return (type(module) is torch.nn.Conv2d and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple) and module.weight.dtype == torch.float32)


def prepack_convolutions(network: torch.nn.Module) -> bool:
    """Replace each prepackable `torch.nn.Conv2d` of a CPU float32 network, in place, by a PrepackedConv2d.
    Returns False, changing nothing, where this torch has no oneDNN, or these ops fail or differ on a probe."""
    if not torch.backends.mkldnn.is_available() or not _works():
        return False
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if prepackable(child):
                setattr(parent, name, PrepackedConv2d(child))
    return True


def _works() -> bool:
    """Whether this torch build (and CPU) runs the ops at all, and to torch's own numbers: a small probe."""
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(1, 3, 9, 7)
    try:
        with torch.no_grad():
            return torch.allclose(PrepackedConv2d(conv)(x), conv(x), rtol=1e-4, atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):  # an op missing, or not for this CPU
        return False
