"""Latency model (profile structure, additive budgets, feasibility, errors) and the ``bench`` subcommand.

No assertion depends on how fast anything runs: the machine is shared, so tests check structure and exact
arithmetic, never timings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from objectives.budgets import BUDGETS, BudgetError, CostTable
from objectives.latency import (
    LatencyError,
    LatencyProfile,
    LatencySettings,
    PhaseProfile,
    phase_runner,
    prefill_flop_costs,
    profile_model,
    profile_phase,
)
from search import study
from surgery.compat import output_cache
from surgery.export import export_pruned
from surgery.load import load_model
from surgery.mask import KeepMask

from tests.families import CASES, tiny_model

STORIES = Path(__file__).resolve().parents[2] / "studies/assets/models/stories260k"
FAST = dict(batch_size=1, seq_len=8, context=8, warmup=0, repeats=2, decode_steps=1)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def profile(llama) -> LatencyProfile:
    return profile_model(llama, LatencySettings(**FAST))


def test_profile_has_one_entry_per_sublayer_and_a_fixed_cost(profile, tmp_path):
    assert set(profile.phases) == {"prefill", "decode"}
    assert profile.model["num_layers"] == 3 and profile.model["model_type"] == "llama"
    assert profile.phases["prefill"].shape == {"batch_size": 1, "seq_len": 8}
    assert profile.phases["decode"].shape == {"batch_size": 1, "context": 8}
    for phase in profile.phases.values():
        assert len(phase.per_sublayer_ms) == 6
        assert all(ms > 0 for ms in phase.per_sublayer_ms) and phase.fixed_ms >= 0
        # the segments are scaled to add up to the un-hooked dense time
        assert phase.fixed_ms + sum(phase.per_sublayer_ms) == pytest.approx(phase.dense_ms, rel=1e-9)
    path = profile.save(tmp_path / "sub" / "latency_profile.json")
    loaded = LatencyProfile.load(path)
    assert loaded.to_json() == profile.to_json()
    assert loaded.table("decode") == profile.table("decode")
    assert not list(path.parent.glob(".*.tmp"))  # atomic write leaves no temp file


def test_latency_table_is_additive_and_dense_cost_is_the_profiled_total(profile):
    table = profile.table("prefill")
    assert (table.name, table.unit) == ("latency_prefill_ms", "ms")
    dense = KeepMask.dense(3)
    assert table.cost(dense) == pytest.approx(profile.phases["prefill"].dense_ms)
    mask = KeepMask.parse("AM,-M,A-")
    assert table.cost(mask) == pytest.approx(table.fixed + sum(table.per_sublayer[i] for i in (0, 1, 3, 4)))
    for index in range(6):
        assert table.cost(dense) - table.cost(dense.without(index)) == pytest.approx(table.per_sublayer[index])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_timeline_profiles_every_family(case):
    model = tiny_model(case)
    settings = LatencySettings(**FAST)
    for phase in ("prefill", "decode"):
        result = profile_phase(model, phase, settings)
        assert len(result.per_sublayer_ms) == 6 and min(result.per_sublayer_ms) > 0


def test_decode_runner_keeps_the_cache_length(llama):
    run = phase_runner(llama, "decode", LatencySettings(**FAST))
    with torch.inference_mode():
        for _ in range(3):
            out = run()
    assert out.logits.shape[:2] == (1, 1)
    assert output_cache(out).get_seq_length() == 8


def _table(fixed: float, per: list[float]) -> CostTable:
    phase = PhaseProfile("prefill", {"batch_size": 1, "seq_len": 8}, fixed, per, fixed + sum(per), 0.0, 1, 0)
    return LatencyProfile({"model_type": "llama"}, "cpu", {"prefill": phase}).table("prefill")


def test_budget_feasibility():
    table = _table(10.0, [20.0, 30.0, 10.0, 30.0])  # dense 100 ms
    assert table.limit(0.25) == pytest.approx(75.0)
    assert table.feasible(KeepMask.parse("AM,--"), 0.25)  # 60 ms
    assert table.feasible(KeepMask.parse("-M,-M"), 0.25)  # 70 ms
    assert not table.feasible(KeepMask.parse("AM,-M"), 0.25)  # 90 ms
    assert not table.feasible(KeepMask.dense(2), 0.01)


def test_budget_no_mask_can_meet_is_a_clear_error():
    table = _table(50.0, [10.0, 20.0, 10.0, 10.0])  # removing everything leaves the fixed 50 of 100 ms
    with pytest.raises(BudgetError, match=r"latency_prefill_ms target 60% removed is infeasible.*50\.0%"):
        table.limit(0.6)
    with pytest.raises(BudgetError, match="fraction removed"):
        table.limit(1.5)


def test_bad_settings_name_every_key():
    with pytest.raises(LatencyError) as error:
        LatencySettings.from_mapping({"seq_len": 0, "bogus": 1})
    assert "latency.seq_len" in str(error.value) and "latency.bogus" in str(error.value)
    with pytest.raises(LatencyError, match="unknown latency phase 'train'"):
        LatencySettings().shape("train")


def test_registered_budgets_store_and_reuse_the_profile(llama, tmp_path):
    build = BUDGETS.get("latency_decode_ms")
    first = build(llama, settings=FAST, study_dir=tmp_path)
    saved = json.loads((tmp_path / "latency_profile.json").read_text())
    assert first.name == "latency_decode_ms" and len(first.per_sublayer) == 6
    assert saved["phases"]["decode"]["per_sublayer_ms"] == list(first.per_sublayer)
    assert build(llama, settings=FAST, study_dir=tmp_path) == first  # same model and shape: read back, not re-measured
    prefill = BUDGETS.get("latency_prefill_ms")(llama, settings=FAST, study_dir=tmp_path)
    both = LatencyProfile.load(tmp_path / "latency_profile.json")
    assert set(both.phases) == {"prefill", "decode"} and both.table("prefill") == prefill
    longer = build(llama, settings={**FAST, "context": 12}, study_dir=tmp_path)  # other shape: measured again
    assert LatencyProfile.load(tmp_path / "latency_profile.json").phases["decode"].shape["context"] == 12
    assert longer.name == "latency_decode_ms"


def test_prefill_flops_by_hand(llama):
    flops = prefill_flop_costs(llama, batch_size=2, seq_len=8)
    tokens, hidden, inter, kv_dim = 16, 32, 64, 2 * 8
    attn = 2 * tokens * (2 * hidden * hidden + 2 * hidden * kv_dim) + 4 * 2 * 4 * 8 * 8 * 8
    assert flops.per_sublayer == (attn, 2 * tokens * 3 * hidden * inter) * 3
    assert flops.fixed == 2 * tokens * hidden * 96
    assert math.isclose(flops.removed_fraction(KeepMask.parse("AM,AM,--")), 1 / 3 * sum(flops.per_sublayer) / flops.dense)


def test_bench_command_prints_ratios(tmp_path, capsys):
    model, tokenizer = load_model(str(STORIES), device="cpu")
    out = export_pruned(model, tokenizer, "AM,-M,AM,--,AM", tmp_path / "export", source=str(STORIES))
    code = study.main(["bench", str(out), "--against", str(STORIES), "--seq-len", "16", "--context", "16",
                       "--warmup", "0", "--repeats", "2", "--decode-steps", "2", "--json", str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    assert code == 0
    for label in ("prefill tokens/s", "decode tokens/s", "decode peak MiB", "KV bytes/token", "export/dense"):
        assert label in printed
    result = json.loads((tmp_path / "b.json").read_text())
    per_attn = 2 * 4 * 8 * 4  # K and V x 4 kv heads x head dim 8 x 4 bytes
    assert result["dense"]["kv_bytes_per_token"] == 5 * per_attn
    assert result["export"]["kv_bytes_per_token"] == 3 * per_attn  # layer 1 lost attention, layer 3 is gone
    assert result["export"]["kv_bytes_per_token_predicted"] == 3 * per_attn
    assert result["ratio"]["kv_bytes_per_token"] == pytest.approx(0.6)
    assert result["ratio"]["parameters"] == pytest.approx(result["export"]["parameters"] / result["dense"]["parameters"])
    assert result["ratio"]["prefill_tokens_per_s"] == pytest.approx(1 / result["ratio"]["prefill_ms"])
    assert "KV bytes/token" in printed and "0.600x" in printed


def test_bench_missing_export_is_a_user_error(tmp_path, capsys):
    code = study.main(["bench", str(tmp_path / "nope"), "--against", str(STORIES)])
    assert code == 2 and "no config.json" in capsys.readouterr().err


def test_interleaved_timing_warms_each_runner_before_its_timed_block():
    from objectives.latency import interleaved_ms

    calls: list[str] = []
    runners = {name: (lambda n=name: calls.append(n)) for name in ("dense", "export")}
    times = interleaved_ms(runners, warmup=1, repeats=2, device="cpu", steps=3)
    assert set(times) == {"dense", "export"} and all(t >= 0 for t in times.values())
    # per round and runner: one untimed call, then the timed block of 3, never split by the other runner
    assert calls == (["dense"] * 4 + ["export"] * 4) * 3
