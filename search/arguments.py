"""The command-line arguments of each ``python -m search.study`` subcommand (``search.study`` lists them).

Declared apart from the commands' code so that building the parser, and every ``--help``, imports argparse and
nothing heavy (torch, transformers, pandas, peft, lm-eval); each command's ``main(args)`` reads them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from surgery.cli import fraction, non_negative_int, positive_float, positive_int
from surgery.formats import add_format_arguments, add_repair_arguments


def study_config(text: str) -> str:
    """argparse type of ``run``'s config: a YAML path, or the name of a study shipped with the package."""
    if Path(text).exists():
        return text
    from studies import bundled_study

    bundled = bundled_study(text)
    return str(bundled) if bundled else text


def run(parser: argparse.ArgumentParser) -> None:
    """``run``: a study config (a YAML path or a shipped study's name) and overrides."""
    parser.add_argument("config", type=study_config,
                        help="study YAML, or the name of a shipped study (e.g. stories260k)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; load no weights")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--storage", help="override the config's Optuna storage (URL, or a journal file *.log)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def report(parser: argparse.ArgumentParser) -> None:
    """``report``: the study directory."""
    parser.add_argument("study_dir", help="a study's output directory (holds config.yaml)")


def export(parser: argparse.ArgumentParser) -> None:
    """``export``: the study directory, the size budget, the ranking and the target directory."""
    parser.add_argument("study_dir", help="a study's output directory")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-params", type=positive_float, metavar="N", help="at most N parameters")
    budget.add_argument("--max-removed", type=positive_float, metavar="K",
                        help="remove K sublayers (a count), or the fraction K of all sublayers when K < 1")
    budget.add_argument("--target", type=positive_float, metavar="T",
                        help="the recommended mask of the study's budget target T (e.g. 0.25; see recommended.csv)")
    parser.add_argument("--objective", choices=("validation", "heldout_ppl", "calibration"), default=None,
                        help="rank masks by validation text (default where the study has it: the recommended masks), "
                             "held-out perplexity (the default otherwise) or the calibration objective")
    parser.add_argument("--out", required=True, help="directory for the exported model")
    parser.add_argument("--force", action="store_true", help="replace a previous export at --out")
    add_format_arguments(parser)
    add_repair_arguments(parser)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the study's model to run its own code (when its config asks for it)")


def bench(parser: argparse.ArgumentParser) -> None:
    """``bench``: the export, the dense model and the shapes and repeats of the timing."""
    parser.add_argument("export_dir", help="directory written by `export` (or any model directory / hub id)")
    parser.add_argument("--against", required=True,
                        help="the dense model it was pruned from (directory, .gguf file or hub id)")
    count = positive_int
    parser.add_argument("--batch-size", type=count, default=1, help="prefill sequences (default 1)")
    parser.add_argument("--seq-len", type=count, default=128, help="prefill tokens per sequence (default 128)")
    parser.add_argument("--context", type=count, default=256, help="decode: tokens in the KV cache (default 256)")
    parser.add_argument("--decode-batch-size", type=count, default=1, help="decode sequences (default 1)")
    parser.add_argument("--decode-steps", type=count, default=8, help="decode steps per timed repeat (default 8)")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--repeats", type=count, default=7, help="timed repeats; the median is reported (default 7)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda:0, ...")
    parser.add_argument("--threads", type=count, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model folder that ships its own Python code (auto_map) to run it")


def confirm(parser: argparse.ArgumentParser) -> None:
    """``confirm``: which front masks, and overrides of the ``confirm:`` settings."""
    parser.add_argument("study_dir", help="a study's output directory (holds config.yaml and the storage)")
    parser.add_argument("--top", type=positive_int, help="confirm the K front masks with the lowest held-out perplexity")
    parser.add_argument("--budgets", type=fraction, nargs="+", help="instead: the best front mask removing >= each fraction")
    parser.add_argument("--config", help="take the confirm: settings from this YAML instead of the study's copy "
                        "(with --masks and no study in STUDY_DIR: the whole study config)")
    parser.add_argument("--tasks", nargs="+", help="override confirm.tasks")
    parser.add_argument("--limit", type=positive_int, help="override confirm.limit (samples per task)")
    parser.add_argument("--limits", nargs="+", metavar="TASK=N", help="override confirm.limits entries: rows of one "
                        "task (N, or all for every row)")
    parser.add_argument("--steps", type=positive_int, help="override confirm.heal.steps")
    parser.add_argument("--masks", help="confirm the masks of this CSV (columns target, mask, optionally strategy, "
                        "as in a study's recommended.csv) instead of the front's; with --config, STUDY_DIR may be a "
                        "new folder for the results")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: model.threads)")
    parser.add_argument("--variants", nargs="+", help="override confirm.variants: measure only these of dense, "
                        "pruned, repaired, healed, repaired_healed now (the others are taken from earlier runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the study's model to run its own code (when its config asks for it)")
