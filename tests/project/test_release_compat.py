"""Exports load and compute the same under every transformers release pyproject.toml allows.

An export (a sublayer one with its own modeling file, and a whole-layer one of the family's class) is loaded by
a fresh interpreter that cannot import this package, with transformers alone: its logits must equal the masked
model's and its greedy tokens must be the same with and without a KV cache. `.ci/run` writes the exports with
the locked releases (`python -m tests.release_reference DIR`) and runs this file in environments holding the
newest and the oldest releases the ranges allow, with DEPTHSEARCH_REFERENCE_EXPORT=DIR; without that variable
the exports are written here by the installed releases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.release_reference import NEW_TOKENS, write_reference

_LOAD = textwrap.dedent("""
    import importlib.abc, json, sys, torch, transformers
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("surgery", "objectives", "search", "tests"):
                raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Block())
    from transformers import AutoModelForCausalLM
    directory, ids, new = sys.argv[1], torch.tensor([json.loads(sys.argv[2])]), int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    def greedy(use_cache):
        out = model.generate(ids, max_new_tokens=new, do_sample=False, use_cache=use_cache, pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].tolist()
        print(json.dumps({"logits": logits, "cached": greedy(True), "uncached": greedy(False),
                          "transformers": transformers.__version__, "class": type(model).__name__}))
""")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    given = os.environ.get("DEPTHSEARCH_REFERENCE_EXPORT")
    if given:
        return Path(given), json.loads((Path(given) / "reference.json").read_text())
    directory = tmp_path_factory.mktemp("reference")
    return directory, write_reference(directory)


def _load_alone(directory: Path, prompt_ids: list[int], cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(cwd / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", "-c", _LOAD, str(directory), json.dumps(prompt_ids), str(NEW_TOKENS)],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["partial", "whole"])
def test_export_loads_alone_and_matches_the_masked_model(reference, kind, tmp_path):
    directory, expected = reference
    want = expected["exports"][kind]
    got = _load_alone(directory / kind, expected["prompt_ids"], tmp_path)
    where = f"export written with {expected['written_with']}, loaded with transformers {got['transformers']}"
    assert got["class"] == ("DepthPrunedLlamaForCausalLM" if kind == "partial" else "LlamaForCausalLM"), where
    worst = max(abs(a - b) for row, ref in zip(got["logits"], want["logits"]) for a, b in zip(row, ref))
    assert worst <= 1e-4, f"{where}: logits differ by {worst}"
    assert got["cached"] == got["uncached"] == want["tokens"], where
