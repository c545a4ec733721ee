"""The subcommands of ``python -m search.study``: one module each, exposing ``main(args) -> int``."""
