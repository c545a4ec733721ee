"""Healing with real peft LoRA on the bundled stories260k, physically pruned by surgery.export."""

from __future__ import annotations

import copy

import pydantic
import pytest
import torch

from objectives.calibration import DataError, TextSource
from search.commands.heal import HealError, HealSettings, corpus_windows, heal, lora_targets, plan, step_loss
from surgery.families import FAMILIES
from surgery.mask import KeepMask

MASK = "AM,A-,-M,AM,--"  # 4 of 10 sublayers removed, one whole layer


@pytest.fixture(scope="module")
def pruned(stories):
    from surgery.export import prune_model

    model, _ = stories
    return prune_model(copy.deepcopy(model), KeepMask.parse(MASK))


@pytest.fixture(scope="module")
def healed(pruned, stories_ids):
    settings = HealSettings(rank=4, alpha=8, steps=12, lr=1e-2, batch_size=4, seq_len=64, warmup=0, seed=0)
    return heal(pruned, stories_ids, settings, progress=False)


def test_every_family_row_has_lora_targets():
    assert all(family.lora for family in FAMILIES.values())


def test_targets_are_the_surviving_projections(pruned):
    targets = lora_targets(pruned)
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_healing_steps_lower_the_lm_loss_on_the_training_batch(pruned, healed, stories_ids):
    settings = HealSettings(seq_len=64)
    with torch.no_grad():
        before = float(step_loss(pruned, stories_ids, settings)[1])
        after = float(step_loss(healed.model, stories_ids, settings)[1])
    assert healed.losses[0] == pytest.approx(before, rel=1e-4)  # step 1 trains on the same 4 windows
    assert after < before - 0.05, (before, after)
    assert healed.mode == "lora-float32" and healed.trainable > 0 and healed.seconds > 0


def test_healed_model_is_plain_transformers_and_pruned_is_untouched(pruned, healed):
    assert type(healed.model) is type(pruned)
    assert not any("lora" in name for name in healed.model.state_dict())
    assert set(healed.model.state_dict()) == set(pruned.state_dict())
    changed = [k for k, v in healed.model.state_dict().items() if not torch.equal(v, pruned.state_dict()[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)


def test_exported_healed_model_reproduces_in_memory_logits(stories, pruned, healed, stories_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from search.commands.heal import healed_into_dense
    from surgery.export import export_pruned

    dense, tokenizer = stories
    mask = KeepMask.parse(MASK)
    out = export_pruned(healed_into_dense(dense, healed.model, mask), tokenizer, mask, tmp_path / "healed")
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = healed.model(input_ids=stories_ids).logits
        got = loaded(input_ids=stories_ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(got, pruned(input_ids=stories_ids).logits, atol=1e-3)


def test_distillation_loss_mixes_kl_to_dense(stories, pruned, stories_ids):
    dense, _ = stories
    lm_only = HealSettings(seq_len=64)
    mixed = HealSettings(seq_len=64, distill=0.5)
    with torch.no_grad():
        total, lm = step_loss(pruned, stories_ids, mixed, teacher=dense)
        same, _ = step_loss(pruned, stories_ids, lm_only, teacher=dense)
        self_kl, _ = step_loss(dense, stories_ids, HealSettings(seq_len=64, distill=1.0), teacher=dense)
    assert same == pytest.approx(float(lm))
    kl = (float(total) - 0.5 * float(lm)) / 0.5
    assert kl > 0.01
    assert float(self_kl) == pytest.approx(0.0, abs=1e-5)


def test_distillation_healing_lowers_kl(stories, pruned, stories_ids):
    dense, _ = stories
    settings = HealSettings(rank=4, steps=8, lr=1e-2, batch_size=4, seq_len=64, warmup=0, distill=1.0)
    result = heal(pruned, stories_ids, settings, teacher=dense, progress=False)
    assert result.losses[-1] < result.losses[0]


def test_empty_or_short_corpus_is_a_clear_error(tmp_path, stories):
    _, tokenizer = stories
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text"):
        corpus_windows(TextSource(files=(str(empty),)), tokenizer, 64)
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    with pytest.raises(DataError, match="fewer than seq_len=64"):
        corpus_windows(TextSource(files=(str(short),)), tokenizer, 64)


def test_bad_settings_name_the_key():
    with pytest.raises(pydantic.ValidationError, match=r"(?s)rank\n.*distill\n"):
        HealSettings(rank=0, distill=1.5)
    with pytest.raises(HealError, match="needs a CUDA device"):
        plan(HealSettings(quantize="4bit"), torch.device("cpu"))
    assert plan(HealSettings(), torch.device("cpu")) == (False, torch.float32)
