"""Captioners: image-to-text models that write `caption` for rows without one.

One module per family, each holding a `Captioner` subclass exported as `CAPTIONER`; the config's
`captioner.kind` is the module name. `stage.py` is the Ray Data stage that runs one of them.
"""

from __future__ import annotations

from pipeline.captioners.base import Captioner
from pipeline.captioners.blip import CAPTIONER as BLIP
from pipeline.captioners.florence2 import CAPTIONER as FLORENCE2

CAPTIONERS: dict[str, type[Captioner]] = {c.kind: c for c in (BLIP, FLORENCE2)}

__all__ = ["CAPTIONERS", "Captioner"]
