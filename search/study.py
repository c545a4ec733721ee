"""``python -m search.study``: run a study, report it, export its winner, confirm, benchmark.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``; this
table is the only place that lists them. User errors (config, paths, masks, budgets, models) print one clear
message and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "run": ("search.run", "run the study a YAML config describes (re-running resumes it)"),
    "report": ("search.report", "write the Pareto report of a study directory"),
    "export": ("search.export_best", "export the best mask within a budget as a smaller model"),
    "bench": ("search.bench", "measure an exported model's prefill/decode speed and memory against the dense model"),
    "confirm": ("search.confirm", "heal the front's best masks with LoRA/QLoRA and benchmark them with lm-eval"),
}

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)  # a bug keeps its traceback


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search.study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).main(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
