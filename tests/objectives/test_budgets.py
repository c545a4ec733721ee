"""Budgets: exact additive cost tables (parameters equal the exported model's), KV bytes, sublayer counts."""

from __future__ import annotations

import pytest
import torch

from objectives.budgets import BUDGETS, BudgetError, param_costs
from objectives.registry import UnknownNameError
from surgery.export import num_params, prune_model
from surgery.mask import KeepMask
from tests.families import tiny_model

STORIES_PARAMS = 260_032


def test_stories260k_param_table(stories):
    model, _ = stories
    table = param_costs(model)
    assert table.dense == num_params(model) == STORIES_PARAMS
    # per layer: attention 64*(64+32+32+64) + norm 64 = 12,352; FFN 3*64*172 + norm 64 = 33,088
    assert table.per_sublayer[:2] == (12_352.0, 33_088.0)
    assert table.fixed == 512 * 64 + 64  # tied embedding/head + final norm


@pytest.mark.parametrize("text", ["AM,A-,-M,AM,--", "-M,-M,-M,-M,-M", "A-,A-,AM,--,--", "AM,AM,AM,AM,AM"])
def test_param_prediction_equals_pruned_model(stories, text):
    model, _ = stories
    mask = KeepMask.parse(text)
    import copy

    assert num_params(prune_model(copy.deepcopy(model), mask)) == param_costs(model).cost(mask)


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "opt", "mixtral", "gpt_neox"])
def test_param_prediction_per_family(family):
    mask = KeepMask.parse("-M,A-,--")
    predicted = param_costs(tiny_model(family)).cost(mask)
    assert num_params(prune_model(tiny_model(family), mask)) == predicted < num_params(tiny_model(family))


def test_kv_cache_and_sublayer_budgets(stories):
    model, _ = stories
    kv = BUDGETS.get("kv_cache_bytes")(model)
    assert kv.dense == 5 * 2 * 4 * 8 * 4  # layers x (K, V) x kv heads x head dim x float32 bytes
    assert kv.cost(KeepMask.parse("A-,-M,-M,AM,--")) == 2 * 2 * 4 * 8 * 4
    count = BUDGETS.get("sublayers")(model)
    assert count.cost(KeepMask.parse("A-,-M,-M,AM,--")) == 5
    assert count.removed_fraction(KeepMask.parse("A-,-M,-M,AM,--")) == pytest.approx(0.5)
    bf16 = BUDGETS.get("kv_cache_bytes")(tiny_model("llama").to(torch.bfloat16))
    assert bf16.dense == 3 * 2 * 2 * 8 * 2


def test_limits_and_infeasible_targets(stories):
    table = param_costs(stories[0])
    assert table.limit(0.25) == pytest.approx(0.75 * STORIES_PARAMS)
    assert table.feasible(KeepMask.parse("AM,AM,AM,AM,--"), 0.15)
    assert not table.feasible(KeepMask.parse("AM,AM,AM,AM,A-"), 0.15)
    with pytest.raises(BudgetError, match="infeasible: removing every sublayer removes only 87.4%"):
        table.limit(0.9)
    with pytest.raises(BudgetError, match="target 1.5 must be a fraction"):
        table.limit(1.5)


def test_unknown_budget_suggests_a_name():
    with pytest.raises(UnknownNameError, match="unknown budget 'param'; did you mean 'params'"):
        BUDGETS.get("param")
