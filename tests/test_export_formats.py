"""``--format gguf`` and ``--format decilm``: each export loaded in the engine that serves it and compared with the
masked model on the same tokens (llama.cpp through llama-cpp-python, the optional ``llamacpp`` extra; transformers
through the checkpoint's own modeling file)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.errors import UserError
from surgery.export import ExportOptions, export_pruned
from surgery.gguf_export import FILE_NAME, ZERO_FFN_WIDTH
from surgery.mask import KeepMask
from surgery.masking import masked

MASKS = {
    "dense": "AM,AM,AM,AM,AM",
    "whole layers": "AM,--,AM,AM,--",
    "attention kept, FFN removed": "AM,A-,A-,AM,AM",
    "mixed": "AM,A-,-M,AM,--",
    "last layer A-": "-M,AM,--,AM,A-",
}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (pip install 'depthsearch[llamacpp]')")
    return llama_cpp


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """Logits of every position of ``tokens`` from llama.cpp."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(str(path), n_ctx=max(64, len(tokens)), logits_all=True, n_threads=1, n_batch=len(tokens),
                          verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def torch_logits(model, mask: str, tokens: list[int]) -> np.ndarray:
    layers = len(mask.split(","))
    with torch.no_grad(), masked(model, KeepMask.parse(mask, layers)):
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    shifted = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(math.exp(-np.mean(logp[np.arange(len(tokens) - 1), tokens[1:]])))


@pytest.fixture(scope="module")
def story_tokens(stories):
    text = Path(__file__).resolve().parents[1].joinpath("studies/assets/text/tinystories_valid.txt").read_text()
    return stories[1](text[:2000])["input_ids"][:96]


@pytest.mark.parametrize("label", list(MASKS))
def test_gguf_from_transformers_runs_in_llama_cpp_as_the_masked_model(stories, story_tokens, tmp_path, label):
    model, tokenizer = stories
    mask = MASKS[label]
    out = export_pruned(model, tokenizer, mask, tmp_path / "g", options=ExportOptions("gguf", "f16"))
    got = llama_cpp_logits(out / FILE_NAME, story_tokens)
    want = torch_logits(model, mask, story_tokens)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert perplexity(got, story_tokens) == pytest.approx(perplexity(want, story_tokens), rel=0.005)
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.97


def test_an_a_minus_layer_keeps_its_attention_in_llama_cpp(stories, story_tokens, tmp_path):
    """The zero FFN keeps llama.cpp from dropping an ``A-`` layer's attention: the export differs from the mask
    that removes that attention too, and matches the one that keeps it."""
    model, tokenizer = stories
    out = export_pruned(model, tokenizer, "AM,A-,AM,AM,AM", tmp_path / "g", options=ExportOptions("gguf", "f16"))
    got = perplexity(llama_cpp_logits(out / FILE_NAME, story_tokens), story_tokens)
    kept = perplexity(torch_logits(model, "AM,A-,AM,AM,AM", story_tokens), story_tokens)
    dropped = perplexity(torch_logits(model, "AM,--,AM,AM,AM", story_tokens), story_tokens)
    assert abs(kept / dropped - 1) > 0.02  # the attention matters on this text
    assert got == pytest.approx(kept, rel=0.005)


def test_gguf_metadata_per_layer_and_tokenizer(stories, tmp_path):
    from gguf import GGUFReader

    model, tokenizer = stories
    out = export_pruned(model, tokenizer, "AM,A-,-M,AM,--", tmp_path / "g", options=ExportOptions("gguf", "q8_0"))
    reader = GGUFReader(out / FILE_NAME)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "deci"
    assert field("deci.block_count") == 4
    assert field("deci.attention.head_count") == [8, 8, 0, 8]
    assert field("deci.feed_forward_length") == [172, ZERO_FFN_WIDTH, 172, 172]
    assert field("tokenizer.ggml.model") == "llama" and len(field("tokenizer.ggml.tokens")) == 512
    names = {t.name for t in reader.tensors}
    assert "blk.2.attn_q.weight" not in names and "blk.2.ffn_up.weight" in names
    assert not np.any(reader.get_tensor([t.name for t in reader.tensors].index("blk.1.ffn_down.weight")).data)
    whole = export_pruned(model, tokenizer, "AM,--,AM,AM,AM", tmp_path / "w", options=ExportOptions("gguf"))
    assert GGUFReader(whole / FILE_NAME).get_field("general.architecture").contents() == "llama"


@pytest.fixture(scope="module")
def stories_gguf(stories, tmp_path_factory):
    """stories260k as a dense f16 GGUF file: a quantized-file source for the copy path."""
    model, tokenizer = stories
    out = export_pruned(model, tokenizer, "AM,AM,AM,AM,AM", tmp_path_factory.mktemp("src") / "dense",
                        options=ExportOptions("gguf", "f16"))
    return out / FILE_NAME


def test_gguf_from_a_gguf_source_copies_kept_tensors_and_runs(stories_gguf, story_tokens, tmp_path):
    from gguf import GGUFReader

    from surgery.load import load_model

    model, tokenizer = load_model(str(stories_gguf), dtype="float32", device="cpu")
    mask = "AM,A-,-M,AM,--"
    out = export_pruned(model, tokenizer, mask, tmp_path / "g",
                        options=ExportOptions("gguf", source_file=stories_gguf))
    source = {t.name: t for t in GGUFReader(stories_gguf).tensors}
    pruned = {t.name: t for t in GGUFReader(out / FILE_NAME).tensors}
    assert pruned["blk.2.ffn_up.weight"].tensor_type == source["blk.2.ffn_up.weight"].tensor_type
    assert bytes(pruned["blk.2.ffn_up.weight"].data) == bytes(source["blk.2.ffn_up.weight"].data)
    assert bytes(pruned["blk.1.attn_q.weight"].data) == bytes(source["blk.1.attn_q.weight"].data)
    assert "blk.4.attn_q.weight" not in pruned
    src_reader = GGUFReader(stories_gguf)
    assert GGUFReader(out / FILE_NAME).get_field("tokenizer.ggml.tokens").contents() == \
        src_reader.get_field("tokenizer.ggml.tokens").contents()
    got = llama_cpp_logits(out / FILE_NAME, story_tokens)
    want = torch_logits(model, mask, story_tokens)
    assert perplexity(got, story_tokens) == pytest.approx(perplexity(want, story_tokens), rel=0.005)


def test_gguf_refusals_write_nothing(tiny, stories, stories_gguf, tmp_path):
    qwen = tiny("qwen2")
    with pytest.raises(UserError, match="GGUF export supports the llama family"):
        export_pruned(qwen, None, "AM,A-,AM", tmp_path / "q", options=ExportOptions("gguf"))
    model, tokenizer = stories
    with pytest.raises(UserError, match="keeps its own quantization"):
        export_pruned(model, tokenizer, "AM,A-,AM,AM,AM", tmp_path / "o",
                      options=ExportOptions("gguf", "q8_0", source_file=stories_gguf))
    with pytest.raises(UserError, match="applies to --format gguf only"):
        ExportOptions("hf", "q8_0")
    assert not any(tmp_path.iterdir())


def test_export_cli_format_gguf_exit_codes(stories_path, tmp_path, capsys):
    from surgery.export import main

    assert main(["--model", str(stories_path), "--mask", "AM,A-,-M,AM,--", "--format", "gguf",
                 "--outtype", "q8_0", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / FILE_NAME).is_file()
    assert "llama.cpp architecture `deci` (q8_0)" in (tmp_path / "g" / "README.md").read_text()
    assert main(["--model", str(stories_path), "--mask", "AM,A-,-M,AM,--", "--format", "hf", "--outtype", "q8_0",
                 "--out", str(tmp_path / "h")]) == 2
    assert "applies to --format gguf only" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


# decilm ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", ["AM,A-,-M,AM,--", "-M,AM,AM,A-,A-"])
def test_decilm_loads_in_transformers_as_the_masked_model(stories, story_tokens, tmp_path, mask):
    from transformers import AutoModelForCausalLM

    model, tokenizer = stories
    out = export_pruned(model, tokenizer, mask, tmp_path / "d", options=ExportOptions("decilm"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    kept = [item for item in mask.split(",") if item != "--"]
    assert [(b["attention"]["no_op"], b["ffn"]["no_op"]) for b in config["block_configs"]] == \
        [(item[0] == "-", item[1] == "-") for item in kept]
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        got = loaded(torch.tensor([story_tokens])).logits[0].double().numpy()
    assert np.abs(got - torch_logits(model, mask, story_tokens)).max() < 1e-4
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    for index, item in enumerate(kept):
        assert (f"model.layers.{index}.self_attn.q_proj.weight" in names) == (item[0] == "A")
        assert (f"model.layers.{index}.post_attention_layernorm.weight" in names) == (item[1] == "M")


def test_decilm_generates_with_a_kv_cache(stories, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = stories
    mask = "AM,A-,-M,AM,--"
    out = export_pruned(model, tokenizer, mask, tmp_path / "d", options=ExportOptions("decilm"))
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.tensor([tokenizer("Once upon a time")["input_ids"]])
    with masked(model, KeepMask.parse(mask)):
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(loaded.generate(ids, max_new_tokens=12, do_sample=False), want)


def test_decilm_refuses_other_families(tiny, tmp_path):
    with pytest.raises(UserError, match="DeciLM checkpoints hold llama-family models"):
        export_pruned(tiny("qwen2"), None, "AM,A-,AM", tmp_path / "d", options=ExportOptions("decilm"))
    assert not any(tmp_path.iterdir())
