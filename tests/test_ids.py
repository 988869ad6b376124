"""Sample identity is a contract across code versions: resume and reproduction depend on the same
(job seed, source content, variant) giving the same sample_id and seed in every release."""

import hashlib
from pathlib import Path

import pyarrow as pa

from pipeline.config import PromptConfig
from pipeline.ids import sample_identity, sample_ids
from pipeline.variants import ExpandVariants

PHOTOS = Path(__file__).resolve().parent.parent / "jobs" / "sample_photos"

# Written by the demo job (seed 0) before the code was reorganised into packages; must never change.
RECORDED = {
    ("astronaut.jpg", 0): ("2e9532743429a7059990c580e28821da", 1440370761897793904),
    ("astronaut.jpg", 1): ("6f32e1142d2a19aeb9ed2e1b60b2f83f", 8853633108251816756),
    ("rocket.jpg", 0): ("c3904b733a7843bb5b7ae8dbae30d360", 5650167182714864174),
    ("rocket.jpg", 1): ("ff06db6c03a2f7ddebc035b08197d64c", 1097480180796359097),
}


def sha256(name: str) -> str:
    return hashlib.sha256((PHOTOS / name).read_bytes()).hexdigest()


def test_ids_and_seeds_of_the_bundled_photos_never_change():
    for (name, variant), recorded in RECORDED.items():
        assert sample_identity(0, sha256(name), variant) == recorded, (name, variant)
    assert sample_ids(0, sha256("astronaut.jpg"), 2) == [RECORDED["astronaut.jpg", v][0] for v in range(2)]
    assert sample_identity(1, sha256("astronaut.jpg"), 0) != RECORDED["astronaut.jpg", 0]  # the job seed counts


def test_expand_variants_gives_those_ids_and_skips_written_ones():
    row = {"source_uri": "astronaut.jpg", "source_sha256": sha256("astronaut.jpg"), "caption": None}
    prompts = PromptConfig(prompts=["a", "b"])
    written = {RECORDED["astronaut.jpg", 0][0]}
    out = ExpandVariants(0, 2, prompts, written.__contains__)(pa.Table.from_pylist([row])).to_pylist()
    assert [(r["sample_id"], r["seed"], r["variant_index"], r["prompt"]) for r in out] == [
        (*RECORDED["astronaut.jpg", 1], 1, "b")]
