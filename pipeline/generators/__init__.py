"""Generator families: one module per family, each holding one `Generator` subclass named in its
module's `GENERATOR`. `generation.family` in a job config names the module (`sd15`, ...).

Modules import torch and diffusers lazily, so a config can be validated without them.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.generators.base import Generator

DEFAULT_FAMILY = "sd15"


@cache
def families() -> tuple[str, ...]:
    """Every family: the modules of this package other than `base` and private ones (`_controlnet`)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_")))


def flat(models: dict[str, Any]) -> list[Any]:
    """The values of a dict of models (or model refs) or lists of them, as one list."""
    return [m for v in models.values() for m in (v if isinstance(v, list) else [v])]


def generator_class(family: str) -> type[Generator]:
    if family not in families():
        raise ValueError(f"unknown generator family {family!r}; known: {list(families())}")
    return importlib.import_module(f"{__name__}.{family}").GENERATOR
