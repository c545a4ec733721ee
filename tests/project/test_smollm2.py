"""SmolLM2-135M-Instruct from its 4-bit GGUF file (`make smollm2`): loading, masking against a hand-computed
residual, an export that loads with plain transformers and gives the masked model's logits, and a short study
that completes and resumes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from search.study import main as study_main
from surgery.export import export_pruned, num_params
from surgery.fetch import MODELS, ROOT
from surgery.load import load_model
from surgery.mask import KeepMask
from surgery.masking import masked

pytestmark = pytest.mark.slow

GGUF = ROOT / MODELS["smollm2"].dest / MODELS["smollm2"].filename
TEXT = ROOT / "studies" / "assets" / "text" / "wikitext2_test.raw"
LAYERS = 30
# layer 2 without attention, layer 7 without FFN, layer 12 gone, every other layer whole
MASK = KeepMask.parse(",".join({2: "-M", 7: "A-", 12: "--"}.get(i, "AM") for i in range(LAYERS)))
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    if not GGUF.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{GGUF} is missing: CI runs `make smollm2` before the tests")
        pytest.skip(f"{GGUF.name} not fetched: run `make smollm2`")
    return GGUF


@pytest.fixture(scope="module")
def smol(gguf_path):
    """(model, tokenizer) in float32 on CPU, loaded once for the module."""
    return load_model(str(gguf_path), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def ids(smol) -> torch.Tensor:
    text = TEXT.read_text(encoding="utf-8")[:4000]
    return smol[1](text, return_tensors="pt").input_ids[:, :24]


def test_loads_as_a_plain_llama(smol):
    model, tokenizer = smol
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size) == ("llama", 30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert num_params(model) == 134_515_008
    assert getattr(config, "quantization_config", None) is None and model.dtype == torch.float32
    assert config.name_or_path == str(GGUF)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, prompt.shape[1]:]).startswith(" Paris")


def _by_hand(model, ids: torch.Tensor, mask: KeepMask) -> torch.Tensor:
    """Logits of ``h = h + attn(norm1(h)); h = h + mlp(norm2(h))`` over the kept sublayers, from the modules."""
    inner = model.model
    h = inner.embed_tokens(ids)
    rope = inner.rotary_emb(h, torch.arange(ids.shape[1])[None])
    for layer, (keep_attn, keep_ffn) in zip(inner.layers, mask.layer_items()):
        if keep_attn:  # no attention mask: sdpa applies the causal one
            h = h + layer.self_attn(layer.input_layernorm(h), position_embeddings=rope, attention_mask=None)[0]
        if keep_ffn:
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))


def test_masked_forward_is_the_hand_computed_residual(smol, ids):
    model = smol[0]
    with torch.no_grad():
        dense = model(ids).logits
        with masked(model, MASK):
            pruned = model(ids).logits
        expected = _by_hand(model, ids, MASK)
    assert (pruned - dense).abs().max() > 1.0  # the removed sublayers matter
    # float32: equal here; the tolerance is a few ulps of logits up to ~40, room for a reordered reduction only
    torch.testing.assert_close(pruned, expected, atol=2e-5, rtol=0)


def test_export_loads_without_gguf_and_gives_the_masked_logits(smol, ids, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = smol
    out = export_pruned(model, tokenizer, MASK, tmp_path / "export", source=str(GGUF))
    assert not list(out.glob("*.gguf")) and (out / "model.safetensors").is_file()
    monkeypatch.setitem(sys.modules, "gguf", None)  # plain transformers: the export must not need gguf
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    removed = 2 * (884_736 + 576) + 2 * (2_654_208 + 576)  # attention of layers 2, 12; FFN of 7, 12; their norms
    assert num_params(exported) == num_params(model) - removed
    with torch.no_grad():
        with masked(model, MASK):
            expected = model(ids).logits
        got = exported(ids).logits
    assert torch.equal(got, expected)  # same modules and weights (float32 safetensors), same arithmetic


def test_short_study_completes_and_resumes(gguf_path, tmp_path, capsys):
    out = tmp_path / "study"
    text = {"files": [str(TEXT)], "num_sequences": 2, "seq_len": 32}
    config = {
        "model": {"name": str(gguf_path), "dtype": "bfloat16", "device": "cpu", "threads": 1},
        "calibration": {**text, "end": 0.5, "seed": 0},
        "heldout": {**text, "start": 0.5, "seed": 1},
        "objective": "kl",
        "budget": {"metric": "params", "targets": [0.05]},  # two whole layers
        "strategies": [{"name": "shortgpt"}, {"name": "sleb", "settings": {"exclude_front": 0.5}}],  # 15 + 14 masks
        "output_dir": str(out),
    }
    path = tmp_path / "smollm2.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert study_main(["run", str(path), "--no-progress"]) == 0
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="depthsearch", storage=storage)
    trials = [(t.number, t.user_attrs["strategy"], t.user_attrs["mask"], t.values) for t in study.get_trials(deepcopy=False)]
    attrs = study.user_attrs
    assert attrs["meta"]["dense"]["params"] == 134_515_008
    for name in ("shortgpt", "sleb"):
        record = attrs[f"strategy:{name}"]
        assert record["done"] and set(record["results"]) == {"0.05"}
    sleb = [mask for _, strategy, mask, _ in trials if strategy == "sleb"]
    assert sorted(mask.count("--") for mask in sleb) == [1] * 15 + [2] * 14  # layers 15-29 alone, then pairs

    assert study_main(["run", str(path), "--no-progress"]) == 0  # resume: nothing evaluated again
    study = optuna.load_study(study_name="depthsearch", storage=storage)
    assert [(t.number, t.user_attrs["strategy"], t.user_attrs["mask"], t.values)
            for t in study.get_trials(deepcopy=False)] == trials
    assert study.user_attrs["heldout"] == attrs["heldout"]
