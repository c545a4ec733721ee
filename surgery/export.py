"""Export a pruned model: physical removal of the masked sublayers, written in one of three formats.

``hf`` (default): a mask that removes only whole layers exports as the family's own class (fewer layers, no custom
code). Any other mask exports as ``DepthPruned<Family>ForCausalLM``: the family's class with the removed sublayers
swapped for weightless stand-ins, its config carrying ``depth_pruning`` and an ``auto_map`` to a copy of
``pruned_modeling.py`` written next to the weights, so ``trust_remote_code=True`` loads it without this package.
``gguf``: one ``model.gguf`` for llama.cpp (``surgery.gguf_export``). ``decilm``: a DeciLM checkpoint with
``block_configs`` for vLLM (``surgery.decilm_export``). Every format is one writer in ``WRITERS``; the directory,
staging, model card and ownership record are shared.

    python -m surgery.export --model studies/assets/models/stories260k --mask "AM,A-,-M,AM,AM" --out pruned/
    python -m surgery.export --model model.Q4_1.gguf --mask "AM,A-,-M,..." --format gguf --out pruned-gguf/
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from . import export_target, pruned_modeling
from .export_target import ExportError
from .families import Family, family_for, get_path
from .mask import KeepMask, sublayer_name
from .masking import masked
from .params import num_params
from .repair import LinearRepair, folded
from .cli import Parser, load_checked, run_cli
from .formats import DEFAULT_RIDGE, FORMATS, add_format_arguments, add_repair_arguments

MODULE_FILE = "pruned_modeling.py"


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


# writing -----------------------------------------------------------------------------------------------------
def check_target(out_dir: Path, force: bool, *, protect: tuple[tuple[str, Path], ...] = ()) -> None:
    """Absent, empty, or (with ``force``) a previous export holding nothing else; never a protected path."""
    export_target.check_target(Path(out_dir), force, protect=protect)


@dataclass(frozen=True)
class ExportOptions:
    """How to write an export: the format, and what the gguf writer needs besides the model."""

    format: str = "hf"
    outtype: str | None = None  # gguf from a transformers model: f16 (default), bf16 or q8_0
    source_file: Path | None = None  # the .gguf file the model was loaded from: gguf copies its tensors
    repair: str = "none"  # "linear": the kept weights get the training-free repair (surgery/repair.py)
    repair_ridge: float = DEFAULT_RIDGE  # its ridge

    def __post_init__(self) -> None:
        if self.format not in WRITERS:
            raise ExportError(f"--format {self.format!r}: choose one of {', '.join(WRITERS)}")
        if self.outtype is not None and self.format != "gguf":
            raise ExportError(f"--outtype {self.outtype} applies to --format gguf only (got --format {self.format})")
        if self.repair != "none" and self.source_file is not None and self.outtype is None:
            raise ExportError(f"--repair {self.repair} rewrites kept weights, which a copy of the .gguf source's "
                              "tensors cannot carry: give --outtype (f16, bf16 or q8_0)")


@dataclass
class ExportJob:
    """What a writer gets: the dense model, its pruned copy, the tokenizer, the mask and the options."""

    model: nn.Module
    pruned: nn.Module
    tokenizer: object
    mask: KeepMask
    options: ExportOptions


def _write_hf(job: ExportJob, directory: Path) -> str:
    pruned = job.pruned
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
    if job.tokenizer is not None:
        job.tokenizer.save_pretrained(directory)
    return f"class: `{type(pruned).__name__}`"


def _write_gguf(job: ExportJob, directory: Path) -> str:
    from .gguf_export import FILE_NAME
    from .gguf_model import write_gguf

    arch = write_gguf(job.model, job.tokenizer, job.mask, directory, source_file=job.options.source_file,
                      outtype=job.options.outtype)
    copied = job.options.source_file is not None and job.options.outtype is None
    how = "tensors copied from the source file" if copied else (job.options.outtype or "f16")
    return f"format: GGUF `{FILE_NAME}`, llama.cpp architecture `{arch}` ({how})"


def _write_decilm(job: ExportJob, directory: Path) -> str:
    from .decilm_export import write_decilm

    write_decilm(job.pruned, job.tokenizer, job.mask, directory)
    return "format: DeciLM checkpoint (`DeciLMForCausalLM`, `block_configs`)"


WRITERS: dict[str, Callable[[ExportJob, Path], str]] = {"hf": _write_hf, "gguf": _write_gguf, "decilm": _write_decilm}
assert tuple(WRITERS) == FORMATS


def export_pruned(
    model: nn.Module,
    tokenizer,
    mask: KeepMask | str,
    out_dir: str | Path,
    *,
    source: str = "",
    metrics: dict | None = None,
    force: bool = False,
    protect: tuple[tuple[str, Path], ...] = (),
    options: ExportOptions | None = None,
    repair: LinearRepair | None = None,
) -> Path:
    """Write the pruned model, tokenizer and a model card to ``out_dir`` atomically; ``model`` is left unchanged.
    ``force`` replaces only a previous export (see ``surgery.export_target``); ``protect`` names paths (the source
    model, a study) that ``out_dir`` must neither be nor hold; ``options`` picks the format (default hf);
    ``repair``'s maps are folded into the kept weights of the export."""
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    check_target(out_dir, force, protect=protect)
    family = family_for(model.config)
    layers = len(get_path(model, family.layers))
    mask = KeepMask.parse(mask, layers) if isinstance(mask, str) else mask
    mask.check_layers(layers)
    if repair is not None and repair.mask != mask:
        raise ExportError(f"the repair was fitted for mask {repair.mask}, not for the exported mask {mask}")
    # a runtime mask left applied (by a scorer) must not leak in; the repair is folded for the writing only
    with masked(model, KeepMask.dense(layers)), folded(model, repair):
        counts = {"dense_params": num_params(model)}
        pruned = prune_model(copy.deepcopy(model), mask)
        counts["pruned_params"] = num_params(pruned)
        job = ExportJob(model, pruned, tokenizer, mask, options)
        return _install(out_dir, lambda staging: WRITERS[options.format](job, staging), mask=mask, source=source,
                        counts=counts, metrics=metrics, format=options.format)


def export_gguf_file(source_file: str | Path, mask: KeepMask | str, out_dir: str | Path, *, source: str = "",
                     metrics: dict | None = None, force: bool = False,
                     protect: tuple[tuple[str, Path], ...] = ()) -> Path:
    """``--format gguf`` from a ``.gguf`` file without loading the model: the kept tensors are copied as they are
    (what ``export_pruned`` with ``ExportOptions("gguf", source_file=...)`` writes, in seconds and without the
    dequantized model in memory). Parameter counts are the files' tensor sizes (the zero stand-ins not counted)."""
    from .gguf_export import FILE_NAME, copy_from_gguf, parameter_counts

    out_dir = Path(out_dir)
    check_target(out_dir, force, protect=protect)
    counts, layers = parameter_counts(Path(source_file), mask)
    mask = KeepMask.parse(mask, layers) if isinstance(mask, str) else mask

    def write(staging: Path) -> str:
        arch = copy_from_gguf(Path(source_file), mask, staging / FILE_NAME)
        return f"format: GGUF `{FILE_NAME}`, llama.cpp architecture `{arch}` (tensors copied from the source file)"

    return _install(out_dir, write, mask=mask, source=source or str(source_file), counts=counts, metrics=metrics,
                    format="gguf")


def _install(out_dir: Path, write: Callable[[Path], str], *, mask: KeepMask, source: str, counts: dict,
             metrics: dict | None, format: str) -> Path:
    """Stage the export (``write`` fills the folder and says what it wrote), add card and ownership record, and
    move it into place; a failure leaves nothing behind."""
    export_target.clean_leftovers(out_dir)
    staging = export_target.staging_dir(out_dir)
    try:
        what = write(staging)
        (staging / "README.md").write_text(model_card(mask, source, counts, metrics, what, format), encoding="utf-8")
        export_target.write_marker(staging, {"tool": "depthsearch", "mask": str(mask), "source": source,
                                             "format": format})
        export_target.install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


_USAGE = {
    "gguf": ["```", "llama-server -m <this directory>/model.gguf", "```"],
    "decilm": ["```", "vllm serve <this directory> --trust-remote-code", "```", "", "```python",
               "from transformers import AutoModelForCausalLM",
               'model = AutoModelForCausalLM.from_pretrained("<this directory>", trust_remote_code=True)', "```"],
}


def model_card(mask: KeepMask, source: str, counts: dict, metrics: dict | None, what: str,
               format: str = "hf") -> str:
    """README.md of an export: where it comes from, what was removed, how big it is, what it scored."""
    removed = ", ".join(sublayer_name(i) for i in mask.removed) or "nothing"
    share = 1 - counts["pruned_params"] / counts["dense_params"]
    library = "transformers" if format == "hf" else {"gguf": "gguf", "decilm": "vllm"}[format]
    lines = [
        "---", f"library_name: {library}", "tags: [depth-pruning, depthsearch]", "---", "",
        f"# Depth-pruned {source or 'model'}", "",
        f"- source model: `{source or 'unknown'}`",
        f"- keep-mask: `{mask}` ({mask.num_layers} layers; A = attention kept, M = FFN kept, - = removed)",
        f"- kept sublayers: {len(mask.kept)} of {len(mask.bits)}; removed {mask.num_removed} "
        f"({mask.removed_attn} attention, {mask.removed_ffn} FFN; whole layers {list(mask.removed_layers)})",
        f"- removed (0-based): {removed}",
        f"- parameters: {counts['pruned_params']:,} of {counts['dense_params']:,} ({share:.1%} removed)",
        f"- {what}",
    ]
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if format in _USAGE:
        return "\n".join(lines + ["", *_USAGE[format], ""])
    load = "" if mask.whole_layers_only else ", trust_remote_code=True"
    lines += ["", "```python", "from transformers import AutoModelForCausalLM",
              f'model = AutoModelForCausalLM.from_pretrained("<this directory>"{load})', "```", ""]
    return "\n".join(lines)


# command line ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m surgery.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local model directory, .gguf file or hub id")
    parser.add_argument("--mask", required=True,
                        help='keep-mask, one item per layer, e.g. "AM,A-,-M,--" (write --mask=--,AM,... when it starts with "-")')
    parser.add_argument("--out", required=True, help="export directory (must be absent or empty unless --force)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--force", action="store_true", help="replace a previous export at --out")
    add_format_arguments(parser)
    add_repair_arguments(parser)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model folder that ships its own Python code (auto_map) to run it")
    return parser


def export_options(args: argparse.Namespace, model_name: str) -> ExportOptions:
    """The options of ``--format`` / ``--outtype`` for a model loaded from ``model_name``."""
    from .gguf_source import is_gguf

    format, outtype = getattr(args, "format", "hf"), getattr(args, "outtype", None)
    repair = getattr(args, "repair", "none")
    ridge = getattr(args, "repair_ridge", None)
    if getattr(args, "calibration", None) and repair == "none":
        raise ExportError("--calibration is the text --repair linear fits on: give --repair linear too")
    if ridge is not None and repair == "none":
        raise ExportError("--repair-ridge sets the fit of --repair linear: give --repair linear too")
    source_file = Path(model_name).expanduser() if format == "gguf" and is_gguf(model_name) else None
    return ExportOptions(format, outtype, source_file, repair, DEFAULT_RIDGE if ridge is None else ridge)


def fitted_repair(options: ExportOptions, model: nn.Module, tokenizer, mask: KeepMask,
                  calibration: list | None) -> tuple[LinearRepair | None, dict]:
    """The repair ``options`` ask for, fitted on ``calibration`` (default: bundled text), and its model-card line."""
    if options.repair == "none":
        return None, {}
    from .repair import describe, fit_for_export

    repair = fit_for_export(model, tokenizer, mask, calibration, ridge=options.repair_ridge)
    return repair, {"repair": f"{describe(repair)}, ridge {options.repair_ridge:g}"}


def describe(out: Path) -> str:
    """One line naming what an export directory holds."""
    config_file = out / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text())["architectures"][0]
    return f"GGUF {out / 'model.gguf'}"


def run(args: argparse.Namespace) -> Path:
    from .load import looks_local

    mask = KeepMask.parse(args.mask)  # syntax errors before the (slow) model load
    options = export_options(args, args.model)
    source = Path(args.model).expanduser() if looks_local(args.model) else None
    protect = (("the source model", source),)
    check_target(Path(args.out), args.force, protect=protect)
    if options.source_file is not None and options.outtype is None:
        out = export_gguf_file(options.source_file, mask, args.out, source=args.model, force=args.force,
                               protect=protect)
    else:
        model, tokenizer = load_checked(args.model, dtype=args.dtype, device="cpu",
                                        trust_remote_code=args.trust_remote_code)
        repair, metrics = fitted_repair(options, model, tokenizer, mask, args.calibration)
        out = export_pruned(model, tokenizer, mask, args.out, source=args.model, force=args.force, protect=protect,
                            options=options, metrics=metrics or None, repair=repair)
    card = (out / "README.md").read_text().splitlines()
    print(f"exported {describe(out)} to {out}")
    print(f"kept {len(mask.kept)} / removed {mask.num_removed} of {len(mask.bits)} sublayers "
          f"({mask.removed_attn} attention, {mask.removed_ffn} FFN)")
    print(next(line for line in card if line.startswith("- parameters:"))[2:])
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a bad flag (one line already printed)
        return stop.code if isinstance(stop.code, int) else 2
    return run_cli(lambda: _exported(args))


def _exported(args: argparse.Namespace) -> int:
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
