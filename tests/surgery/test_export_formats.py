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
    text = Path(__file__).resolve().parents[2].joinpath("studies/assets/text/tinystories_valid.txt").read_text()
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


def test_gguf_refusals_write_nothing(tiny, tmp_path):
    qwen = tiny("qwen2")
    with pytest.raises(UserError, match="GGUF export supports the llama family"):
        export_pruned(qwen, None, "AM,A-,AM", tmp_path / "q", options=ExportOptions("gguf"))
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


@pytest.mark.slow
def test_decilm_converts_with_llama_cpps_converter_and_runs(stories, story_tokens, tmp_path):
    """llama.cpp's ``convert_hf_to_gguf.py`` (from its source tree; path in ``LLAMA_CPP_CONVERTER``, with its
    ``gguf-py`` beside it) turns a decilm export into a GGUF that llama.cpp runs as the masked model. The converter
    reads ``ffn_mult``, so the model's FFN width is a multiple of 256; no ``A-`` layer (see decilm_export)."""
    import os
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    converter = os.environ.get("LLAMA_CPP_CONVERTER")
    if not converter or not Path(converter).is_file():
        pytest.skip("set LLAMA_CPP_CONVERTER to llama.cpp's convert_hf_to_gguf.py")
    _llama_cpp()
    torch.manual_seed(0)
    base = stories[0].config
    model = LlamaForCausalLM(LlamaConfig(**{**base.to_dict(), "intermediate_size": 256, "architectures": None})).eval()
    mask = "AM,-M,--,AM,-M"
    out = export_pruned(model, stories[1], mask, tmp_path / "d", options=ExportOptions("decilm"))
    gguf_file = tmp_path / "converted.gguf"
    env = dict(os.environ, PYTHONPATH=str(Path(converter).parent / "gguf-py"))
    subprocess.run([sys.executable, converter, str(out), "--outfile", str(gguf_file), "--outtype", "f32"],
                   check=True, env=env, capture_output=True)
    got = llama_cpp_logits(gguf_file, story_tokens)
    want = torch_logits(model, mask, story_tokens)
    assert perplexity(got, story_tokens) == pytest.approx(perplexity(want, story_tokens), rel=0.005)


def test_gguf_file_export_needs_no_model_and_writes_the_same_file(stories_gguf, tmp_path):
    from surgery.export import export_gguf_file
    from surgery.load import load_model

    mask = "AM,A-,-M,AM,--"
    fast = export_gguf_file(stories_gguf, mask, tmp_path / "fast")
    model, tokenizer = load_model(str(stories_gguf), dtype="float32", device="cpu")
    slow = export_pruned(model, tokenizer, mask, tmp_path / "slow", options=ExportOptions("gguf", source_file=stories_gguf))
    assert (fast / FILE_NAME).read_bytes() == (slow / FILE_NAME).read_bytes()
    line = lambda out: next(x for x in (out / "README.md").read_text().splitlines() if "parameters:" in x)  # noqa: E731
    assert line(fast) == line(slow)


def test_study_export_takes_format(stories_gguf, tmp_path):
    from search.study import main as study_main
    from tests.faults import study_config, write_yaml

    config = write_yaml(tmp_path / "s.yaml", study_config(tmp_path / "s", strategies=[{"name": "shortgpt"}],
                                                          model={"name": str(stories_gguf)}))
    assert study_main(["run", str(config), "--no-progress"]) == 0
    for format in ("gguf", "decilm"):
        target = tmp_path / format
        assert study_main(["export", str(tmp_path / "s"), "--max-removed", "4", "--format", format,
                           "--out", str(target)]) == 0
        assert json.loads((target / "depthsearch-export.json").read_text())["format"] == format
    assert (tmp_path / "gguf" / FILE_NAME).is_file() and (tmp_path / "decilm" / "modeling_decilm.py").is_file()


def test_a_llamacpp_latency_profile_is_what_the_latency_budget_reads(stories, stories_gguf, tmp_path):
    """Timings of pruned GGUF files in llama.cpp, fitted and saved as the study's ``latency.profile``, are the
    ``latency_decode_ms`` / ``latency_prefill_ms`` tables (nothing is re-measured in torch)."""
    from objectives.latency import device_name, latency_costs, model_signature
    from objectives.llamacpp import SpeedSettings, calibration_masks, llamacpp_profile, speeds
    from surgery.gguf_export import copy_from_gguf

    _llama_cpp()
    model = stories[0]
    masks = calibration_masks(5)
    files = {}
    for index, (name, mask) in enumerate(masks.items()):
        files[name] = tmp_path / f"{index}.gguf"
        copy_from_gguf(stories_gguf, KeepMask.parse(mask), files[name])
    settings = SpeedSettings(seq_len=16, context=16, steps=2, repeats=1, warmup=0, threads=1)
    profile = llamacpp_profile(speeds(files, settings), masks, signature=model_signature(model),
                               device=device_name(torch.device("cpu")), settings=settings)
    path = profile.save(tmp_path / "latency.json")
    for phase in ("prefill", "decode"):
        table = latency_costs(model, phase, {"profile": str(path), "seq_len": 16, "context": 16})
        assert table.per_sublayer == tuple(profile.phases[phase].per_sublayer_ms)
        assert table.fixed == profile.phases[phase].fixed_ms


def test_gguf_source_rewritten_in_another_type_keeps_its_tokenizer(stories_gguf, story_tokens, tmp_path):
    from gguf import GGUFReader

    from surgery.load import load_model

    model, tokenizer = load_model(str(stories_gguf), dtype="float32", device="cpu")
    mask = "AM,A-,-M,AM,--"
    out = export_pruned(model, None, mask, tmp_path / "q", options=ExportOptions("gguf", "q8_0", stories_gguf))
    reader, source = GGUFReader(out / FILE_NAME), GGUFReader(stories_gguf)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
        assert reader.get_field(key).contents() == source.get_field(key).contents()
    got = llama_cpp_logits(out / FILE_NAME, story_tokens)
    want = perplexity(torch_logits(model, mask, story_tokens), story_tokens)
    assert perplexity(got, story_tokens) == pytest.approx(want, rel=0.03)  # q8_0 weights and activations
