"""Calibration batches, the cached dense reference, proxy objectives and per-layer statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from objectives.calibration import BatchSpec, DataError, TextSource, load_text, token_batch
from objectives.proxy import OBJECTIVES, Reference, angular_distances, block_influence, js, kl
from objectives.scorer import MaskScorer
from surgery.mask import KeepMask
from surgery.masking import masked


def test_token_batches_are_seeded_and_shaped(stories, text_path):
    tokenizer = stories[1]
    source = TextSource(files=(str(text_path),), end=0.8)
    a = token_batch(BatchSpec(source, num_sequences=3, seq_len=32, seed=7), tokenizer)
    b = token_batch(BatchSpec(source, num_sequences=3, seq_len=32, seed=7), tokenizer)
    c = token_batch(BatchSpec(source, num_sequences=3, seq_len=32, seed=8), tokenizer)
    assert a.shape == (3, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_and_heldout_slices_are_disjoint(text_path):
    full = load_text(TextSource(files=(str(text_path),)))
    calib = load_text(TextSource(files=(str(text_path),), end=0.8))
    held = load_text(TextSource(files=(str(text_path),), start=0.8))
    assert calib + held == full and len(calib) == int(0.8 * len(full))


def test_jsonl_source_and_errors(tmp_path, stories):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"Once upon a time there was a cat number {i}."}) for i in range(40)))
    ids = token_batch(BatchSpec(TextSource(files=(str(path),), field="body"), num_sequences=2, seq_len=16), stories[1])
    assert ids.shape == (2, 16)
    with pytest.raises(DataError, match="rows.jsonl: line 1 has no field 'text'"):
        load_text(TextSource(files=(str(path),)))
    with pytest.raises(DataError, match="text file not found"):
        load_text(TextSource(files=(str(tmp_path / "missing.txt"),)))
    with pytest.raises(DataError, match="too few for 500 sequences"):
        token_batch(BatchSpec(TextSource(files=(str(path),), field="body"), num_sequences=500, seq_len=16), stories[1])


def test_kl_of_a_mask_with_itself_is_zero_and_grows_with_removal(stories, stories_ids):
    model, _ = stories
    mask = KeepMask.parse("AM,A-,AM,AM,AM")
    with torch.no_grad(), masked(model, mask):
        logits = model(stories_ids).logits
    assert float(kl(logits, Reference.from_logits(logits), stories_ids)) == 0.0
    scorer = MaskScorer(model, stories_ids, "kl", batch_size=4)
    assert scorer.score(KeepMask.dense(5)) == 0.0
    one, two = scorer.score(mask), scorer.score(mask.without(4))
    assert 0.0 < one < two
    assert scorer.score(KeepMask.dense(5)) == 0.0  # masking is undone exactly between trials


def _dense_and_masked_logits(model, ids, mask: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        dense = model(ids).logits
        with masked(model, mask):
            return dense, model(ids).logits


def test_topk_reference_bounds_full_kl(stories, stories_ids):
    dense, pruned = _dense_and_masked_logits(stories[0], stories_ids, "AM,-M,AM,A-,AM")
    full, top = Reference.from_logits(dense), Reference.from_logits(dense, topk=16)
    exact, binned = float(kl(pruned, full, stories_ids)), float(kl(pruned, top, stories_ids))
    manual = F.kl_div(F.log_softmax(pruned[:, :-1], -1), F.log_softmax(dense[:, :-1], -1), log_target=True,
                      reduction="sum")
    assert exact == pytest.approx(float(manual), rel=1e-4)
    assert 0.0 < binned <= exact
    assert top.nbytes < full.nbytes / 10
    assert float(kl(pruned, Reference.from_logits(dense, topk=512), stories_ids)) == pytest.approx(exact, rel=1e-5)


def test_js_and_perplexity(stories, stories_ids):
    model, _ = stories
    dense, pruned = _dense_and_masked_logits(model, stories_ids, "-M,AM,AM,AM,--")
    positions = stories_ids.shape[0] * (stories_ids.shape[1] - 1)
    forward = float(js(pruned, Reference.from_logits(dense), stories_ids)) / positions
    backward = float(js(dense, Reference.from_logits(pruned), stories_ids)) / positions
    assert forward == pytest.approx(backward, rel=1e-4) and 0.0 < forward <= math.log(2)
    scorer = MaskScorer(model, stories_ids, "ppl", batch_size=4)
    nll = F.cross_entropy(dense[:, :-1].reshape(-1, 512), stories_ids[:, 1:].reshape(-1))
    assert scorer.score(KeepMask.dense(5)) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert OBJECTIVES.get("ppl").needs_reference is False


def test_layer_statistics_match_hand_computation(stories, stories_ids):
    scorer = MaskScorer(stories[0], stories_ids, "kl", batch_size=4)
    hidden = scorer.hidden_states()
    assert len(hidden) == 6 and hidden[0].shape == (4, 64, 64)
    d = angular_distances(hidden, 2)
    cos = F.cosine_similarity(hidden[1][:, -1], hidden[3][:, -1], dim=-1)
    assert d.shape == (4,) and float(d[1]) == pytest.approx(float((torch.arccos(cos) / math.pi).mean()), rel=1e-5)
    bi = block_influence(hidden)
    manual = 1 - F.cosine_similarity(hidden[2], hidden[3], dim=-1).mean()
    assert bi.shape == (5,) and float(bi[2]) == pytest.approx(float(manual), rel=1e-5)
    with pytest.raises(ValueError, match="block size n=6"):
        angular_distances(hidden, 6)
