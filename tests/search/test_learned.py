"""Sublayer gates (surgery/gates.py) and the learned-mask strategy, on the bundled stories260k model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from objectives.budgets import BUDGETS
from objectives.calibration import BatchSpec, TextSource, token_batch
from objectives.scorer import MaskScorer
from search.strategies import STRATEGIES, StrategySettingsError
from search.strategies.learned import HardConcrete, LearnedMasks, budget_shift, round_to_budget
from surgery.gates import SublayerGates, frozen, mask_values
from surgery.load import load_model
from surgery.mask import KeepMask
from surgery.masking import masked, masker_for
from tests.strategy_runs import make_context, run_strategy

ASSETS = Path(__file__).resolve().parents[2] / "studies" / "assets"
TARGETS = (0.1, 0.3, 0.5)
FAST = dict(steps=40, batch=2, progress=False)


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    model, tokenizer = load_model(str(ASSETS / "models" / "stories260k"), device="cpu")
    source = TextSource(files=(str(ASSETS / "text" / "tinystories_valid.txt"),), end=0.8)
    ids = token_batch(BatchSpec(source, num_sequences=4, seq_len=64, seed=0), tokenizer)
    return model, ids


@pytest.fixture(scope="module")
def scorer(loaded):
    model, ids = loaded
    return MaskScorer(model, ids, "kl", batch_size=4)


@pytest.fixture
def ctx(scorer, tmp_path):
    """A study of the learned gates in an SQLite file, at the budget targets ``TARGETS``."""
    return make_context(tmp_path, scorer, BUDGETS.get("params")(scorer.model), TARGETS)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_gates_at_ones_reproduce_dense_exactly(loaded):
    model, ids = loaded
    dense = logits(model, ids)
    with SublayerGates(model) as gates:
        assert len(gates.values) == 10 and gates.values.sum().item() == 10
        gated = logits(model, ids)
    assert torch.equal(gated, dense)


@pytest.mark.parametrize("text", ["AM,A-,-M,--,AM", "--,AM,A-,AM,-M", "--,--,--,--,--"])
def test_hard_gates_reproduce_runtime_masking_exactly(loaded, text):
    model, ids = loaded
    mask = KeepMask.parse(text)
    with masked(model, mask):
        expected = logits(model, ids)
    with SublayerGates(model, mask_values(mask)):
        gated = logits(model, ids)
    assert torch.equal(gated, expected)
    assert not torch.equal(gated, logits(model, ids))


def test_per_sequence_gates_reproduce_each_sequences_masking_exactly(loaded):
    model, ids = loaded
    masks = [KeepMask.parse(t) for t in ("AM,A-,-M,--,AM", "AM,AM,AM,AM,AM", "--,AM,A-,AM,-M", "A-,-M,AM,AM,--")]
    expected = []
    for row, mask in zip(ids, masks):
        with masked(model, mask):
            expected.append(logits(model, row[None])[0])
    with SublayerGates(model, torch.stack([mask_values(m) for m in masks])):
        gated = logits(model, ids)
    assert torch.allclose(gated, torch.stack(expected), atol=1e-5)


def test_gates_removed_afterwards_leave_model_dense_and_flags_restored(loaded):
    model, ids = loaded
    dense = logits(model, ids)
    model.lm_head.weight.requires_grad_(True)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    masker_for(model).apply(KeepMask.parse("AM,A-,AM,AM,AM"))
    with frozen(model), SublayerGates(model, torch.full((10,), 0.5, requires_grad=True)) as gates:
        assert not any(p.requires_grad for p in model.parameters())
        assert masker_for(model).current == KeepMask.dense(5)  # runtime mask lifted while gated
        out = model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean()
        out.backward()
        assert gates.values.grad is not None and gates.values.grad.abs().sum() > 0
    assert masker_for(model).current == KeepMask.parse("AM,A-,AM,AM,AM")  # previous mask back
    masker_for(model).restore()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(logits(model, ids), dense)


def test_hard_concrete_reaches_exact_zero_and_one():
    gates = HardConcrete(4, beta=2 / 3)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-8.0, -1.0, 1.0, 8.0]))
    samples = torch.stack([gates.sample(torch.Generator().manual_seed(s)) for s in range(200)])
    assert (samples[:, 0] == 0).all() and (samples[:, 3] == 1).all()
    assert 0 < (samples[:, 1] == 0).float().mean() < 1
    assert torch.equal(gates.deterministic()[[0, 3]], torch.tensor([0.0, 1.0]))
    empirical = (samples != 0).float().mean(0)
    assert torch.allclose(empirical, gates.keep_prob().detach(), atol=0.1)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_budget_shift_holds_expected_cost_on_the_limit(fraction):
    gates = HardConcrete(6, beta=2 / 3)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0, 0.0]))
    costs = torch.tensor([1.0, 3.0, 1.0, 3.0, 1.0, 3.0])
    limit = 5.0 + (1 - fraction) * float(costs.sum())
    shift = budget_shift(gates, costs, 5.0, limit)
    expected = 5.0 + (gates.keep_prob(shift) * costs).sum()
    assert abs(float(expected.detach()) - limit) < 1e-4
    expected.backward()  # the implicit gradient keeps the cost on the limit: d cost / d log_alpha == 0
    assert gates.log_alpha.grad.abs().max() < 1e-4
    assert float(budget_shift(gates, costs, 5.0, 5.0 + float(costs.sum()) + 1)) == 30.0  # no pressure


def test_rounding_keeps_by_score_within_budget(ctx):
    scores = [float(10 - i) for i in range(10)]  # prefer early sublayers
    for target in TARGETS:
        mask = round_to_budget(scores, ctx.budget, target)
        assert ctx.feasible(mask, target)
        # nothing removed could be added back within the budget
        assert all(not ctx.feasible(mask.with_kept(i), target) for i in mask.removed)
    assert round_to_budget(scores, ctx.budget, 0.1).bits[:8] == (True,) * 8


def test_trained_masks_meet_every_budget_and_are_recorded(ctx, scorer):
    _, run, result = run_strategy(ctx, "learned", **FAST)
    assert len(ctx.study.get_trials()) <= LearnedMasks().candidates * len(TARGETS)
    assert set(result) == set(TARGETS)
    for target, mask in result.items():
        assert mask is not None and ctx.feasible(mask, target)
        assert ctx.costs.removed_fraction(mask) >= target - 1e-9
    trials = ctx.study.get_trials()
    assert {str(m) for m in result.values()} <= {t.user_attrs["mask"] for t in trials}
    for target, mask in result.items():  # the returned mask is the best of its target's roundings
        own = [t.values[0] for t in trials if t.user_attrs["target"] == target]
        assert ctx.values[str(mask)] == min(own)
    assert all(t.user_attrs["strategy"] == "learned" for t in trials)
    assert run.forwards >= 3 * FAST["steps"] * FAST["batch"] * len(TARGETS)
    assert len(run.notes) == len(TARGETS) and "evaluations-equivalent" in run.notes[0]
    assert all(p.requires_grad for p in scorer.model.parameters())  # weights' flags restored


def test_expected_cost_reaches_the_target(ctx):
    for target in (0.1, 0.5):
        trained = LearnedMasks(**FAST).train(ctx.strategy_run("learned"), target, seed=0)
        assert abs(trained.expected_removed - target) < 0.005


def test_deterministic_with_seed(ctx):
    strategy = LearnedMasks(**FAST, seed=3)
    first = strategy.train(ctx.strategy_run("learned"), 0.3, seed=3)
    second = strategy.train(ctx.strategy_run("learned"), 0.3, seed=3)
    other = strategy.train(ctx.strategy_run("learned"), 0.3, seed=4)
    assert first == second
    assert first.scores != other.scores


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"temperature": 0}, "temperature"),
        ({"final_temperature": -1}, "final_temperature"),
        ({"batch": 0}, "batch"),
        ({"warmup": 1.5}, "warmup"),
        ({"candidates": 0}, "candidates"),
        ({"seed": "x"}, "seed"),
        ({"progress": "yes"}, "progress"),
    ],
)
def test_bad_settings_name_the_setting(settings, name):
    with pytest.raises(StrategySettingsError, match=rf"setting '{name}': input should be"):
        LearnedMasks(**settings)


def test_unknown_setting_is_a_clear_error():
    with pytest.raises(StrategySettingsError, match="learned.*'temprature'; did you mean 'temperature'"):
        STRATEGIES.get("learned").from_settings({"temprature": 1.0})
