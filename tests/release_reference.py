"""Reference exports of the bundled model, for checking that an export loads the same under other releases.

    python -m tests.release_reference DIR

writes, with the installed releases, a sublayer export and a whole-layer export of stories260k into DIR and
``reference.json``: the masked model's logits and greedy tokens for a fixed prompt (this package's masking) and
the versions that wrote them. ``tests/project/test_release_compat.py`` loads the exports with transformers alone.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch

from surgery.export import export_pruned
from surgery.fetch import ROOT
from surgery.load import load_model
from surgery.masking import masked

MODEL = ROOT / "studies" / "assets" / "models" / "stories260k"
MASKS = {"partial": "-M,A-,AM,--,AM", "whole": "AM,--,AM,AM,--"}  # partial: layer 0 without attention, ...
PROMPT = "Once upon a time, a little girl named Lily"
NEW_TOKENS = 12


def greedy(model, ids: torch.Tensor, *, use_cache: bool) -> list[int]:
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def write_reference(directory: Path) -> dict:
    """Export both masks into ``directory`` and record what the masked model computes."""
    model, tokenizer = load_model(str(MODEL), dtype="float32", device="cpu")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = {"prompt_ids": ids[0].tolist(), "written_with": _versions(), "exports": {}}
    for name, mask in MASKS.items():
        with torch.no_grad(), masked(model, mask):
            logits = model(input_ids=ids).logits[0]
            tokens = greedy(model, ids, use_cache=True)
        export_pruned(model, tokenizer, mask, directory / name, source=str(MODEL))
        reference["exports"][name] = {"mask": mask, "logits": logits.tolist(), "tokens": tokens}
    (directory / "reference.json").write_text(json.dumps(reference))
    return reference


def _versions() -> dict:
    return {name: version(name) for name in ("torch", "transformers", "safetensors", "tokenizers")}


if __name__ == "__main__":
    write_reference(Path(sys.argv[1]))
