"""Training-free linear repair (surgery/repair.py): runs, exact folding, a fit that helps, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from surgery.families import family_for, get_path
from surgery.mask import KeepMask
from surgery.masking import masked
from surgery.export import main as export_main
from surgery.fetch import ROOT
from surgery.load import load_model
from surgery.repair import (LinearRepair, RepairError, Run, _solve, fit_for_export, fit_linear_repair, folded,
                            out_projection, removed_runs)
from tests.families import BY_NAME, input_ids, tiny_model

MASK = KeepMask.parse("AM,-M,A-,--,AM")  # runs: A1 (anchor M0), M2..A3..M3 (anchor A2)


def _logits(model, mask, ids):
    with torch.no_grad(), masked(model, mask):
        return model(input_ids=ids).logits.float()


def _kl(dense, logits):
    return torch.nn.functional.kl_div(logits.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


def test_runs_follow_a_kept_sublayer():
    assert removed_runs(MASK) == [Run(2, 3), Run(5, 8)]
    assert removed_runs(KeepMask.parse("-M,AM")) == []  # no kept sublayer before A0
    assert removed_runs(KeepMask.parse("A-,--")) == [Run(1, 4)]
    assert removed_runs(KeepMask.dense(3)) == []


@pytest.fixture
def deep():
    """A seeded tiny Llama with five layers."""
    config = BY_NAME["llama"].config()
    config.num_hidden_layers = 5
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_folding_equals_an_explicit_linear_module(deep):
    ids = input_ids(batch=4, seq=12)
    repair = fit_linear_repair(deep, MASK, ids)
    assert set(repair.maps) == {1, 4}
    with folded(deep, repair):
        folded_logits = _logits(deep, MASK, ids)
    explicit = copy.deepcopy(deep)
    family = family_for(explicit.config)
    for anchor, t in repair.maps.items():
        proj = out_projection(explicit, family, anchor)
        extra = nn.Linear(t.shape[0], t.shape[1], bias=False)
        extra.weight.data = t.T.clone()
        layer, _ = divmod(anchor, 2)
        parent_path, _, name = (family.attn_out if anchor % 2 == 0 else family.ffn_out).rpartition(".")
        parent = explicit.get_submodule(f"{family.layers}.{layer}.{parent_path}")
        setattr(parent, name, nn.Sequential(proj, extra))
    torch.testing.assert_close(folded_logits, _logits(explicit, MASK, ids), atol=1e-4, rtol=1e-4)


def test_fit_brings_the_pruned_model_closer_to_the_dense_one_and_weights_come_back(deep):
    ids = input_ids(batch=8, seq=12)
    dense = _logits(deep, KeepMask.dense(5), ids)
    before = _logits(deep, MASK, ids)
    repair = fit_linear_repair(deep, MASK, ids)
    with folded(deep, repair):
        after = _logits(deep, MASK, ids)
    assert _kl(dense, after) < _kl(dense, before)
    assert all(fit[1] < fit[0] for fit in repair.fit_error.values())
    assert torch.equal(_logits(deep, KeepMask.dense(5), ids), dense)  # folding was undone


def test_a_huge_ridge_keeps_the_identity(deep):
    repair = fit_linear_repair(deep, MASK, input_ids(batch=2, seq=8), ridge=1e9)
    for t in repair.maps.values():
        torch.testing.assert_close(t, torch.eye(t.shape[0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox"])
def test_families_whose_sublayers_end_in_a_norm_or_run_in_parallel_are_refused(family):
    model = tiny_model(family)
    with pytest.raises(RepairError, match="linear repair"):
        fit_linear_repair(model, KeepMask.parse("AM,--,AM"), input_ids(batch=1, seq=6))


STORIES = ROOT / "studies" / "assets" / "models" / "stories260k"
STORIES_MASK = "AM,-M,A-,--,AM"


@pytest.mark.parametrize("ridge", [None, 0.5])
def test_export_with_repair_loads_with_the_repaired_masked_logits(tmp_path, ridge):
    out = tmp_path / "repaired"
    flags = [] if ridge is None else ["--repair-ridge", str(ridge)]
    assert export_main(["--model", str(STORIES), f"--mask={STORIES_MASK}", "--out", str(out), "--repair", "linear",
                        *flags]) == 0
    model, tokenizer = load_model(str(STORIES), dtype="float32", device="cpu")
    ids = tokenizer("Once upon a time there was a dog", return_tensors="pt").input_ids
    repair = fit_for_export(model, tokenizer, STORIES_MASK, **({} if ridge is None else {"ridge": ridge}))
    with folded(model, repair):
        expected = _logits(model, KeepMask.parse(STORIES_MASK), ids)
    unrepaired = _logits(model, KeepMask.parse(STORIES_MASK), ids)
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        got = exported(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - unrepaired).abs().max() > 1e-2  # the repair is really in the weights
    assert "| repair | linear, 2 map(s) folded (relative stream error after L0.ffn:" in (out / "README.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--calibration", "x.txt"], "--calibration is the text --repair linear fits on"),
    (["--repair-ridge", "0.1"], "--repair-ridge sets the fit of --repair linear"),
    (["--repair", "linear", "--repair-ridge", "0"], "--repair-ridge: expected a finite number > 0, got '0'"),
    (["--repair", "linear", "--repair-ridge", "nan"], "--repair-ridge: expected a finite number > 0, got 'nan'"),
    (["--repair", "linear", "--calibration", "missing.txt"], "missing.txt"),
    (["--repair", "linear", "--calibration", "studies/assets/text/tinystories_valid.txt:0.9:0.2"], "START:END"),
])
def test_export_repair_flags_refused_with_nothing_written(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code = export_main(["--model", str(STORIES), f"--mask={STORIES_MASK}", "--out", str(out), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_fit_does_not_depend_on_a_mask_left_applied(deep):
    ids = input_ids(batch=4, seq=10)
    clean = fit_linear_repair(deep, MASK, ids)
    with masked(deep, KeepMask.parse("--,AM,AM,AM,--")):
        inside = fit_linear_repair(deep, MASK, ids)
    for anchor, t in clean.maps.items():
        torch.testing.assert_close(inside.maps[anchor], t)


def _whole_forward(model, mask, ids, boundary, anchor=None):
    """The stream entering sublayer ``boundary`` under ``mask`` (and the anchor's projection output), from a whole
    forward, flat without each sequence's first position."""
    family = family_for(model.config)
    layers, seen = get_path(model, family.layers), {}
    projections = {s: out_projection(model, family, s) for s in {anchor, boundary - 1} - {None}}  # model unmasked
    where = layers[boundary // 2] if boundary < 2 * len(layers) else get_path(model, family.final_norm)
    hooks = [where.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(into=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)]
    for name, s in (("anchor", anchor), ("attention", boundary - 1 if boundary % 2 else None)):
        if s is not None:
            hooks.append(projections[s].register_forward_hook(lambda m, a, out, name=name: seen.update({name: out})))
    with torch.no_grad(), masked(model, mask):
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    seen = {name: t[:, 1:].reshape(-1, t.shape[-1]).float() for name, t in seen.items()}
    return seen["into"] + seen.get("attention", 0), seen.get("anchor")


@pytest.mark.parametrize("text", ["A-,-M,A-,-M,A-", "AM,A-,--,-M,A-", "-M,AM,--,A-,AM"])
def test_fit_equals_a_whole_forward_per_run(deep, text):
    """Reference: each run's streams from a whole forward (dense targets; the masked model with earlier maps
    folded), the fit weighted by 1 / |X|^2; mid-layer run ends and a run to the last layer included."""
    mask, ids = KeepMask.parse(text), input_ids(batch=4, seq=10)
    expected = LinearRepair(mask, {}, {})
    for run in removed_runs(mask):
        target = _whole_forward(deep, KeepMask.dense(5), ids, run.end)[0]
        with folded(deep, expected):
            stream, m = _whole_forward(deep, mask, ids, run.end, run.anchor)
        gap = target - stream
        expected.maps[run.anchor] = _solve(m, gap + m, 0.1, 1 / target.pow(2).sum(-1))
    got = fit_linear_repair(deep, mask, ids, ridge=0.1)
    assert set(got.maps) == set(expected.maps) and len(got.maps) >= 2
    for anchor, t in expected.maps.items():
        torch.testing.assert_close(got.maps[anchor], t, rtol=1e-5, atol=1e-5)


def test_a_repair_fitted_for_another_mask_is_refused(tmp_path):
    from surgery.export import ExportError, export_pruned

    model, tokenizer = load_model(str(STORIES), dtype="float32", device="cpu")
    repair = fit_linear_repair(model, STORIES_MASK, tokenizer("Once upon a time", return_tensors="pt").input_ids)
    with pytest.raises(ExportError, match="fitted for mask"):
        export_pruned(model, tokenizer, "AM,AM,--,AM,AM", tmp_path / "out", repair=repair)
    assert not (tmp_path / "out").exists()
