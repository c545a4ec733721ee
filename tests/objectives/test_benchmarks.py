"""lm-eval in memory on the local tasks: real runs with small limits on the bundled stories260k model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from objectives import benchmarks
from objectives.benchmarks import UnknownTaskError

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "studies" / "assets" / "benchmarks"
LOCAL = {"arc_easy", "arc_challenge", "piqa", "openbookqa", "boolq", "copa", "winogrande", "lambada_openai",
         "hellaswag", "tinystories_ppl", "tinystories_cloze", "tinystories_next"}


def _rows(name: str, n: int) -> list[dict]:
    lines = (BENCH / name).read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_every_local_task_is_indexed_and_its_file_exists():
    assert set(benchmarks.local_tasks()) == LOCAL
    for path in benchmarks.TASKS_DIR.glob("*.yaml"):
        text = path.read_text()
        file = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("file:"))
        assert (BENCH / file).is_file(), path


def test_tinystories_files_rebuild_identically(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tinystories", benchmarks.TASKS_DIR / "build_tinystories.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    counts = module.build(tmp_path)
    for name, count in counts.items():
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (BENCH / f"{name}.jsonl").read_bytes()
        assert count > 500


def test_local_tasks_run_in_memory_from_any_cwd(stories, tmp_path, monkeypatch):
    model, tokenizer = stories
    monkeypatch.chdir(tmp_path)  # the data paths must not depend on the working directory
    results = benchmarks.evaluate(model, tokenizer, ["tinystories_ppl", "tinystories_next", "copa"], limit=12,
                                  limits={"copa": 8}, batch_size=8, progress=False)
    ppl, nxt, copa = results["tinystories_ppl"], results["tinystories_next"], results["copa"]
    assert (ppl.samples, nxt.samples, copa.samples) == (12, 12, 8)
    assert ppl.headline == "word_perplexity" and not ppl.higher_is_better
    # word and byte perplexity come from the same summed log-likelihood of the first 12 paragraphs
    docs = [row["text"] for row in _rows("tinystories_ppl.jsonl", 12)]
    words, nbytes = sum(len(d.split()) for d in docs), sum(len(d.encode()) for d in docs)
    assert math.log(ppl.metrics["word_perplexity"]) * words == pytest.approx(
        math.log(ppl.metrics["byte_perplexity"]) * nbytes, rel=1e-6)
    assert 1.0 < ppl.metrics["byte_perplexity"] < 10.0
    assert nxt.headline == "acc" and nxt.higher_is_better
    assert round(nxt.value * 12) == pytest.approx(nxt.value * 12, abs=1e-9)  # k correct out of 12
    assert 0.0 <= copa.value <= 1.0 and round(copa.value * 8) == pytest.approx(copa.value * 8, abs=1e-9)


def test_trained_model_beats_chance_on_next_sentence_and_perplexity_orders_models(stories):
    import copy

    import torch

    model, tokenizer = stories
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.5, alpha=1.0)
    good = benchmarks.evaluate(model, tokenizer, ["tinystories_ppl"], limit=10, progress=False)["tinystories_ppl"]
    bad = benchmarks.evaluate(noisy, tokenizer, ["tinystories_ppl"], limit=10, progress=False)["tinystories_ppl"]
    assert good.value < bad.value
    assert good.retained(good.value) == pytest.approx(100.0)
    assert bad.retained(good.value) == pytest.approx(100.0 * good.value / bad.value)


def test_unknown_task_lists_close_matches():
    with pytest.raises(UnknownTaskError, match="did you mean 'tinystories_ppl'") as error:
        benchmarks.check_tasks(["tinystories_ppl", "tinystory_ppl"], hub=False)
    assert isinstance(error.value, ValueError)


@pytest.mark.slow
def test_unknown_task_is_looked_up_in_lm_evals_index_too():
    with pytest.raises(UnknownTaskError, match="did you mean 'arc_easy'"):
        benchmarks.check_tasks(["arc_easyy"])
    assert benchmarks.resolve_task("hub:arc_easy")[0] == "arc_easy"
    assert benchmarks.resolve_task("arc_easy")[1] is benchmarks._manager(False)


def test_per_task_limit_resolution():
    assert benchmarks.task_limit("copa", 20, {"copa": 5}) == 5
    assert benchmarks.task_limit("piqa", 20, {"copa": 5}) == 20
    assert benchmarks.task_limit("piqa", None, None) is None
