"""``python -m search.study``: run a study, report it, export its winner, confirm, benchmark.

Each subcommand is a module exposing ``main(args) -> int`` plus its arguments in ``search.arguments`` (light, so
``--help`` imports no torch); this table is the only place that lists them. User errors (a ``surgery.errors.UserError``: config, paths, masks,
budgets, models, flags) and a full disk print one clear message and exit with code 2; SIGINT / SIGTERM stop
cleanly (exit 130 / 143; a re-run resumes); anything else is a bug and keeps its traceback (``surgery.cli``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from search import arguments
from surgery.cli import Parser, run_cli

SUBCOMMANDS = {  # name: (module with main(args), help, the arguments it takes)
    "run": ("search.commands.run", "run the study a YAML config describes (re-running resumes it)", arguments.run),
    "report": ("search.commands.report", "write the Pareto report of a study directory", arguments.report),
    "export": ("search.commands.export", "export the best mask within a budget as a smaller model", arguments.export),
    "bench": ("search.commands.bench", "measure an exported model's prefill/decode speed and memory against the dense model",
              arguments.bench),
    "confirm": ("search.commands.confirm", "benchmark the front's best masks (or a masks CSV) pruned, repaired and "
                "LoRA-healed with lm-eval and held-out perplexity",
                arguments.confirm),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m search.study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text, add_arguments) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(command_module=module)
        add_arguments(command)  # the module itself is imported only when its command runs
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a bad flag (one line already printed)
        return stop.code if isinstance(stop.code, int) else 2
    return run_cli(lambda: importlib.import_module(args.command_module).main(args))


if __name__ == "__main__":
    sys.exit(main())
