"""Export: pruned models reload with the masked model's logits and generations, with and without this package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from objectives.budgets import param_costs
from surgery.export import ExportError, export_pruned, main, num_params, prune_model
from surgery.mask import KeepMask, MaskError
from surgery.masking import masked, masker_for
from tests.families import BY_NAME, CASES, input_ids, tiny_model

PARTIAL = KeepMask.parse("-M,A-,AM")  # attention of layer 0 and FFN of layer 1 removed
WHOLE = KeepMask.parse("AM,--,AM")
GENERATE = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)


def _run(model, mask):
    """(logits, greedy generation) of ``model`` under ``mask``."""
    with torch.no_grad(), masked(model, mask):
        return model(input_ids()).logits, model.generate(input_ids(batch=1, seq=6), **GENERATE)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per family, computed on first use: the dense model, its masked outputs and the two exports."""
    root, cache = tmp_path_factory.mktemp("exports"), {}

    def get(name):
        if name not in cache:
            model = tiny_model(name)
            record = {"model": model, "dirs": {}, "runs": {}}
            for kind, mask in (("partial", PARTIAL), ("whole", WHOLE)):
                record["runs"][kind] = _run(model, mask)
                record["dirs"][kind] = export_pruned(model, None, mask, root / f"{name}-{kind}", source=f"tiny-{name}")
            cache[name] = record
        return cache[name]

    get.root = root
    return get


def _reload(directory):
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def test_partial_export_matches_masked_model(case, exports):
    record = exports(case.name)
    directory, (logits, generated) = record["dirs"]["partial"], record["runs"]["partial"]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == f"depthpruned_{record['model'].config.model_type}"
    assert config["auto_map"]["AutoModelForCausalLM"] == f"pruned_modeling.{config['architectures'][0]}"
    assert config["depth_pruning"]["keep"] == "-M,A-,AM"
    assert (directory / "pruned_modeling.py").is_file() and (directory / "README.md").is_file()
    model = _reload(directory)
    with torch.no_grad():
        assert (model(input_ids()).logits - logits).abs().max() <= 1e-5
        assert torch.equal(model.generate(input_ids(batch=1, seq=6), **GENERATE), generated)
    assert num_params(model) == param_costs(record["model"]).cost(PARTIAL)


def test_whole_layer_export_is_the_vanilla_class(case, exports):
    record = exports(case.name)
    directory, (logits, generated) = record["dirs"]["whole"], record["runs"]["whole"]
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == [type(record["model"]).__name__]
    assert "auto_map" not in config and "depth_pruning" not in config
    assert not (directory / "pruned_modeling.py").exists()
    model = _reload(directory)
    assert type(model) is type(record["model"]) and model.config.num_hidden_layers == 2
    with torch.no_grad():
        assert (model(input_ids()).logits - logits).abs().max() <= 1e-5
        assert torch.equal(model.generate(input_ids(batch=1, seq=6), **GENERATE), generated)
    assert num_params(model) == param_costs(record["model"]).cost(WHOLE)


_REMOTE = textwrap.dedent("""
    import importlib.abc, json, sys, torch
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("surgery", "objectives", "search", "tests"):
                raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Block())
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[1]))
    for directory in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(ids).logits, directory + ".logits.pt")
        print(type(model).__name__, type(model).__module__)
""")


def _load_remotely(exports, tmp_path, cases):
    directories = [str(exports(case.name)["dirs"]["partial"]) for case in cases]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-I", "-c", _REMOTE, json.dumps(input_ids().tolist()), *directories],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("transformers_modules") == len(cases)
    for case, directory in zip(cases, directories):
        logits = torch.load(directory + ".logits.pt")
        assert (logits - exports(case.name)["runs"]["partial"][0]).abs().max() <= 1e-5, case.name


def test_trust_remote_code_loads_without_this_package(exports, tmp_path):
    """A fresh interpreter that cannot import this package loads the exports (OPT: a two-module FFN)."""
    _load_remotely(exports, tmp_path, [BY_NAME["llama"], BY_NAME["opt"]])


@pytest.mark.slow
def test_trust_remote_code_loads_every_family(exports, tmp_path):
    _load_remotely(exports, tmp_path, CASES)


def test_prune_model_in_memory_matches_masked():
    model = tiny_model("gemma2")
    mask = KeepMask.parse("-M,--,A-")
    logits, _ = _run(model, mask)
    pruned = prune_model(tiny_model("gemma2"), mask)
    assert type(pruned).__name__ == "DepthPrunedGemma2ForCausalLM"
    assert pruned.config.num_hidden_layers == 2 and pruned.config.layer_types == ["sliding_attention", "sliding_attention"]
    attention = [(type(layer.self_attn).__name__, layer.self_attn.layer_idx) for layer in pruned.model.layers]
    assert attention == [("SkippedAttention", 0), ("Gemma2Attention", 1)]  # cache layers renumbered
    with torch.no_grad():
        assert torch.equal(pruned(input_ids()).logits, logits)
    assert num_params(pruned) == param_costs(model).cost(mask)


def test_export_leaves_the_model_unchanged_even_while_masked(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        dense = model(input_ids()).logits
        with masked(model, "A-,AM,AM"):
            before = model(input_ids()).logits
            export_pruned(model, None, PARTIAL, tmp_path / "out")
            assert masker_for(model).current == KeepMask.parse("A-,AM,AM")
            assert torch.equal(model(input_ids()).logits, before)
        assert torch.equal(model(input_ids()).logits, dense)
    assert num_params(model) == num_params(tiny_model("llama"))


def test_stories260k_export_card_and_budget(stories, stories_path, tmp_path):
    model, tokenizer = stories
    mask = KeepMask.parse("AM,A-,-M,AM,--")
    out = export_pruned(model, tokenizer, mask, tmp_path / "pruned", source=str(stories_path),
                        metrics={"kl": 0.125, "removed_params": "34.9%"})
    exported = _reload(out)
    predicted = param_costs(model).cost(mask)
    assert num_params(exported) == predicted == 169_152
    card = (out / "README.md").read_text()
    assert "`AM,A-,-M,AM,--`" in card and "169,152 of 260,032" in card and "| kl | 0.125 |" in card
    assert "removed 4 (2 attention, 2 FFN; whole layers [4])" in card
    assert (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no staging directory left behind


def test_existing_target_needs_force_and_force_replaces_only_an_export(tmp_path):
    model, target = tiny_model("llama"), tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_pruned(model, None, WHOLE, target)
    with pytest.raises(ExportError, match="not written by a depthsearch export"):
        export_pruned(model, None, WHOLE, target, force=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    (target / "keep.txt").unlink()
    export_pruned(model, None, WHOLE, target)
    export_pruned(model, None, PARTIAL, target, force=True)  # a previous export is replaced
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "depthsearch-export.json",
                                                        "generation_config.json", "model.safetensors",
                                                        "pruned_modeling.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_export_leaves_nothing(tmp_path):
    with pytest.raises(AttributeError):
        export_pruned(tiny_model("llama"), "not a tokenizer", PARTIAL, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_masks_are_rejected(tmp_path):
    model = tiny_model("opt")
    with pytest.raises(MaskError, match="has 2 layers but the model has 3"):
        export_pruned(model, None, "AM,AM", tmp_path / "a")
    with pytest.raises(ExportError, match="removes every layer"):
        export_pruned(model, None, "--,--,--", tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mask", "AM,XX,AM,AM,AM"], "bad mask item 'XX' at layer 1"),
        (["--mask", "AM,AM"], "has 2 layers but the model has 5"),
        (["--mask", "AM,AM", "--model", "./no/such/dir"], "no config.json"),
        (["--mask", "AM,AM,AM,AM,AM", "--dtype", "float8"], "unknown dtype 'float8'"),
    ],
)
def test_cli_errors_exit_2_and_write_nothing(args, message, stories_path, tmp_path, capsys):
    argv = ["--model", str(stories_path), "--out", str(tmp_path / "out"), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_non_empty_out_and_unsupported_family(stories_path, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert main(["--model", str(stories_path), "--mask", "AM,AM,AM,AM,--", "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    bert = tmp_path / "bert"
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, is_decoder=True)).save_pretrained(bert)
    assert main(["--model", str(bert), "--mask", "AM", "--out", str(tmp_path / "b-out")]) == 2
    assert "unsupported model architecture 'bert'" in capsys.readouterr().err
    assert not (tmp_path / "b-out").exists()


def test_cli_exports_and_prints_counts(stories_path, tmp_path, capsys):
    assert main(["--model", str(stories_path), "--mask", "AM,--,AM,AM,--", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "exported LlamaForCausalLM" in printed
    assert "kept 6 / removed 4 of 10 sublayers (2 attention, 2 FFN)" in printed
    assert "parameters: 169,152 of 260,032 (34.9% removed)" in printed
