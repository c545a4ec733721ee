"""Perplexity of exported models on text the study never saw, with plain transformers (no project code).

    python benchmarks/independent_ppl.py --text wiki_valid=PATH.tokens --text stories_train=PATH.txt \
        --model dense=studies/assets/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --model evo25=runs/smollm2-135m/exports/evolutionary-0.25 ...
    python benchmarks/independent_ppl.py --smoke     # seconds: the sizes of SMOKE; model and text as in SMOKE_INPUTS

Each model is loaded with ``AutoModelForCausalLM.from_pretrained`` (``gguf_file=`` for a .gguf, remote code for a
pruned export, as a user of the export would), each text is tokenized once and cut into ``--windows`` consecutive
windows of ``--seq-len`` tokens spread evenly over the text; the perplexity is exp(mean next-token loss) over all
windows. Prints one markdown table (models x texts) and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
# --smoke: these sizes replace the given ones; SMOKE_INPUTS stand in for --model / --text when they are not given
SMOKE = {"windows": 2, "seq_len": 32, "batch_size": 2}
SMOKE_INPUTS = {"model": [f"stories260k={ROOT / 'studies/assets/models/stories260k'}"],
                "text": [f"tinystories_valid={ROOT / 'studies/assets/text/tinystories_valid.txt'}"]}


def load(path: str, dtype: torch.dtype):
    source = Path(path)
    if source.suffix == ".gguf":
        kwargs = {"gguf_file": source.name}
        source = source.parent
    else:
        kwargs = {"trust_remote_code": True}
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source), **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
    return model, tokenizer


def windows(text: str, tokenizer, count: int, length: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < count * length:
        raise SystemExit(f"text too short for {count} x {length} tokens ({len(ids)} tokens)")
    starts = torch.linspace(0, len(ids) - length, count).long()
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, batch: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(batch), batch_size):
        ids = batch[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(loss), count + ids[:, 1:].numel()
    return math.exp(total / count)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="NAME=PATH (a .gguf file or a model folder)")
    parser.add_argument("--text", action="append", help="NAME=PATH of a plain-text file")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--smoke", action="store_true", help="seconds: the sizes of SMOKE (inputs: SMOKE_INPUTS)")
    args = parser.parse_args(argv)
    if args.smoke:
        given = vars(args)
        args = argparse.Namespace(**(given | {k: v for k, v in SMOKE_INPUTS.items() if not given[k]} | SMOKE))
    for flag in ("model", "text"):
        if not getattr(args, flag):
            parser.error(f"--{flag} is required (or --smoke)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = dict(item.split("=", 1) for item in args.text)
    results: dict[str, dict[str, float]] = {}
    for name, path in (item.split("=", 1) for item in args.model):
        model, tokenizer = load(path, getattr(torch, args.dtype))
        params = sum(p.numel() for p in model.parameters())
        results[name] = {"params": params}
        for text_name, text_path in texts.items():
            batch = windows(Path(text_path).read_text(encoding="utf-8"), tokenizer, args.windows, args.seq_len)
            results[name][text_name] = perplexity(model, batch, args.batch_size)
        print(name, results[name], flush=True)
    print("| model | params | " + " | ".join(texts) + " |\n|---|---|" + "---|" * len(texts))
    for name, row in results.items():
        print(f"| {name} | {row['params']:,} | " + " | ".join(f"{row[t]:.2f}" for t in texts) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
