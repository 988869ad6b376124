"""Sample identity: `sample_id` and `seed` from (job seed, source sha256, variant index) only, so
they are the same on any cluster size, in any order, on a re-run or a resume."""

from __future__ import annotations

import hashlib
from typing import Any


def derive(*parts: Any) -> bytes:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()


def sample_identity(job_seed: int, source_sha256: str, variant: int) -> tuple[str, int]:
    """(sample_id, seed) of one variant of one source."""
    sample_id = derive("sample", job_seed, source_sha256, variant).hex()[:32]
    seed = int.from_bytes(derive("seed", job_seed, source_sha256, variant)[:8], "big") >> 1  # fits int64
    return sample_id, seed


def sample_ids(job_seed: int, source_sha256: str, variants: int) -> list[str]:
    """The sample ids of every variant of one source."""
    return [sample_identity(job_seed, source_sha256, v)[0] for v in range(variants)]
