"""Shared fixtures: the bundled real models and text, and the tiny per-family models of ``tests/families.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.families import CASES, tiny_model

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "studies" / "assets"
STORIES = ASSETS / "models" / "stories260k"

# The test models are tiny: thread start-up and spinning cost more than they save (3x slower on 2 busy cores).
torch.set_num_threads(1)
TEXT = ASSETS / "text" / "tinystories_valid.txt"


@pytest.fixture(scope="session")
def stories_path() -> Path:
    """The bundled 5-layer Llama (stories260k)."""
    return STORIES


@pytest.fixture(scope="session")
def text_path() -> Path:
    """Bundled TinyStories validation text (calibration: [0, 0.8], held-out: [0.8, 1])."""
    return TEXT


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) of stories260k in float32 on CPU; tests mask it only through ``masked``/maskers."""
    from surgery.load import load_model

    return load_model(str(STORIES), dtype="float32", device="cpu")


@pytest.fixture(autouse=True)
def _stories_dense_after_each_test(request):
    """The session's stories260k model is dense again after every test that used it (a scorer leaves its last
    mask applied, and later tests copy or export the model)."""
    yield
    if "stories" in request.fixturenames:
        masker = request.getfixturevalue("stories")[0].__dict__.get("_depthsearch_masker")
        if masker is not None:
            masker.restore()


@pytest.fixture(scope="session")
def stories_ids(stories) -> torch.Tensor:
    """4 calibration sequences of 64 tokens from the bundled text."""
    from objectives.calibration import BatchSpec, TextSource, token_batch

    source = TextSource(files=(str(TEXT),), end=0.8)
    return token_batch(BatchSpec(source, num_sequences=4, seq_len=64, seed=0), stories[1])


@pytest.fixture
def tiny():
    """Factory: ``tiny("llama", seed=0)`` -> a fresh seeded tiny model of that family."""
    return tiny_model


@pytest.fixture(params=CASES, ids=str)
def case(request):
    """Every family case of ``tests/families.py`` in turn."""
    return request.param
