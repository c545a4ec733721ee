"""Export a pruned model: physical removal of the masked sublayers and a ``save_pretrained`` that loads exactly.

A mask that removes only whole layers exports as the family's own class (fewer layers, no custom code). Any
other mask exports as ``DepthPruned<Family>ForCausalLM``: the family's class with the removed sublayers swapped
for weightless stand-ins, its config carrying ``depth_pruning`` and an ``auto_map`` to a copy of
``pruned_modeling.py`` written next to the weights, so ``trust_remote_code=True`` loads it without this package.

    python -m surgery.export --model studies/assets/models/stories260k --mask "AM,A-,-M,AM,AM" --out pruned/
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

from torch import nn

from . import pruned_modeling
from .families import Family, family_for, get_path
from .mask import ATTN, KeepMask, MaskError
from .masking import masked
from .errors import UserError

MODULE_FILE = "pruned_modeling.py"


class ExportError(UserError):
    """An export that cannot be done: target directory in the way, or a mask that leaves no model."""


# physical removal --------------------------------------------------------------------------------------------
def _drop_layers(model: nn.Module, family: Family, keep: list[int]) -> None:
    """Keep only the decoder layers ``keep``; renumber their layer indices and shorten the per-layer config."""
    layers = get_path(model, family.layers)
    kept = nn.ModuleList(layers[i] for i in keep)
    parent, _, name = family.layers.rpartition(".")
    setattr(get_path(model, parent) if parent else model, name, kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        config.__dict__["layer_types"] = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)


def pruning_spec(family: Family, mask: KeepMask, source_mask: KeepMask) -> dict:
    """The ``config.depth_pruning`` entry: the kept sublayers of the remaining layers, in the family's names."""
    return {
        "keep": str(mask),
        "source_mask": str(source_mask),
        "source_layers": [i for i, (a, m) in enumerate(source_mask.layer_items()) if a or m],
        "layers": family.layers,
        "attn": family.attn,
        "ffn": list(family.ffn),
        "attn_norms": list(family.attn_norms),
        "ffn_norms": list(family.ffn_norms),
    }


def _to_pruned_class(model: nn.Module, spec: dict) -> None:
    """Give the model the registered partially-pruned config and class of its family."""
    old = model.config
    config_class, model_class = pruned_modeling.pruned_classes(old.model_type)
    values = {k: v for k, v in old.to_dict().items() if k not in ("model_type", "kv_sharing_modes")}
    values["depth_pruning"] = spec
    new = config_class.from_dict(values)
    for key, value in old.__dict__.items():  # runtime settings outside to_dict (attention implementation, ...)
        if key.startswith("_") and key.endswith("_internal"):
            new.__dict__[key] = value
    for module in model.modules():  # sub-models hold the same config object (read e.g. for the KV cache)
        if getattr(module, "config", None) is old:
            module.config = new
    model.__class__ = model_class


def prune_model(model: nn.Module, mask: KeepMask) -> nn.Module:
    """Remove ``mask``'s sublayers physically, in place (deep-copy first to keep the dense model); returns it.

    Whole removed layers are dropped from the layer list; remaining removed sublayers become weightless
    stand-ins, and the model becomes its family's ``DepthPruned...ForCausalLM`` (what ``export_pruned`` saves).
    """
    family = family_for(model.config)
    layers = get_path(model, family.layers)
    mask.check_layers(len(layers))
    keep_layers = [i for i, (a, m) in enumerate(mask.layer_items()) if a or m]
    if not keep_layers:
        raise ExportError(f"mask {mask} removes every layer: nothing is left to export")
    masker = model.__dict__.pop("_depthsearch_masker", None)
    if masker is not None:
        masker.restore()
    _drop_layers(model, family, keep_layers)
    rest = KeepMask(tuple(b for i in keep_layers for b in mask.bits[2 * i : 2 * i + 2]))
    if not rest.whole_layers_only:
        spec = pruning_spec(family, rest, mask)
        pruned_modeling.prune_sublayers(model, spec)
        _to_pruned_class(model, spec)
    return model


def num_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# writing -----------------------------------------------------------------------------------------------------
def check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"export target {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"export target {out_dir} exists and is not empty (use --force / force=True to replace it)")


def _save(pruned: nn.Module, tokenizer, directory: Path) -> None:
    partial = isinstance(getattr(pruned.config, "depth_pruning", None), dict)
    if partial:
        config_name = type(pruned.config).__name__
        pruned.config.auto_map = {
            "AutoConfig": f"{MODULE_FILE[:-3]}.{config_name}",
            "AutoModelForCausalLM": f"{MODULE_FILE[:-3]}.{type(pruned).__name__}",
        }
    pruned.save_pretrained(directory)
    if partial:
        shutil.copyfile(Path(pruned_modeling.__file__), directory / MODULE_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _install(staging: Path, out_dir: Path) -> None:
    """Move the finished export into place (replacing ``out_dir`` when it exists)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_pruned(
    model: nn.Module,
    tokenizer,
    mask: KeepMask | str,
    out_dir: str | Path,
    *,
    source: str = "",
    metrics: dict | None = None,
    force: bool = False,
) -> Path:
    """Write the pruned model, tokenizer and a model card to ``out_dir`` atomically; ``model`` is left unchanged."""
    out_dir = Path(out_dir)
    check_target(out_dir, force)
    family = family_for(model.config)
    layers = len(get_path(model, family.layers))
    mask = KeepMask.parse(mask, layers) if isinstance(mask, str) else mask
    mask.check_layers(layers)
    with masked(model, KeepMask.dense(layers)):  # a runtime mask left applied (by a scorer) must not leak in
        counts = {"dense_params": num_params(model)}
        pruned = prune_model(copy.deepcopy(model), mask)
    counts["pruned_params"] = num_params(pruned)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _save(pruned, tokenizer, staging)
        (staging / "README.md").write_text(model_card(mask, source, counts, metrics, type(pruned).__name__))
        _install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def model_card(mask: KeepMask, source: str, counts: dict, metrics: dict | None, class_name: str) -> str:
    """README.md of an export: where it comes from, what was removed, how big it is, what it scored."""
    removed = ", ".join(f"L{i // 2}.{'attn' if i % 2 == ATTN else 'ffn'}" for i in mask.removed) or "nothing"
    share = 1 - counts["pruned_params"] / counts["dense_params"]
    lines = [
        "---", "library_name: transformers", "tags: [depth-pruning, depthsearch]", "---", "",
        f"# Depth-pruned {source or 'model'}", "",
        f"- source model: `{source or 'unknown'}`",
        f"- keep-mask: `{mask}` ({mask.num_layers} layers; A = attention kept, M = FFN kept, - = removed)",
        f"- kept sublayers: {len(mask.kept)} of {len(mask.bits)}; removed {mask.num_removed} "
        f"({mask.removed_attn} attention, {mask.removed_ffn} FFN; whole layers {list(mask.removed_layers)})",
        f"- removed (0-based): {removed}",
        f"- parameters: {counts['pruned_params']:,} of {counts['dense_params']:,} ({share:.1%} removed)",
        f"- class: `{class_name}`",
    ]
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    load = "" if mask.whole_layers_only else ", trust_remote_code=True"
    lines += ["", "```python", "from transformers import AutoModelForCausalLM",
              f'model = AutoModelForCausalLM.from_pretrained("<this directory>"{load})', "```", ""]
    return "\n".join(lines)


# command line ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m surgery.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local model directory or hub id")
    parser.add_argument("--mask", required=True, help='keep-mask, one item per layer, e.g. "AM,A-,-M,--"')
    parser.add_argument("--out", required=True, help="export directory (must be absent or empty unless --force)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    return parser


def run(args: argparse.Namespace) -> Path:
    from .load import load_model

    mask = KeepMask.parse(args.mask)  # syntax errors before the (slow) model load
    check_target(Path(args.out), args.force)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    out = export_pruned(model, tokenizer, mask, args.out, source=args.model, force=args.force)
    config = json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text().splitlines()
    print(f"exported {config['architectures'][0]} to {out}")
    print(f"kept {len(mask.kept)} / removed {mask.num_removed} of {len(mask.bits)} sublayers "
          f"({mask.removed_attn} attention, {mask.removed_ffn} FFN)")
    print(next(line for line in card if line.startswith("- parameters:"))[2:])
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, KeyError, MaskError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
