"""Scorers: the quality gate after generation.

- `metrics.py`: the metrics as plain functions (edge F1, (MS-)SSIM, RMSE, mIoU, PCK, angular error,
  Laplacian variance), each equal to its torchmetrics / scikit-image reference;
- `base.py`: which metric scores which annotator's condition, in which direction, and the gate;
- `clip.py`: the CLIP score (transformers `CLIPModel`);
- `stage.py`: `Scorer` (rows -> scored rows) and `Score`, the Ray Data stage;
- `rescore.py`: `python -m pipeline score OUT`, scoring an existing output in place.
"""

from pipeline.scorers.base import METRIC_OF, Metric, metric_for, passes

__all__ = ["METRIC_OF", "Metric", "metric_for", "passes"]
