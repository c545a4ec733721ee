"""Dataset loader for the local lm-eval tasks: JSON lines from the bundled studies/assets/benchmarks (package data).

lm-eval resolves ``dataset_kwargs.data_files`` against the working directory, so the task YAMLs name their file
in ``dataset_kwargs.file`` and load it through ``custom_dataset: !function utils.load_jsonl``, which resolves
the name against the bundled benchmark folder (``DEPTHSEARCH_BENCHMARKS`` overrides it).
"""

from __future__ import annotations

import os
from pathlib import Path

from studies import assets

BENCHMARKS = assets("benchmarks")


def benchmark_dir() -> Path:
    return Path(os.environ.get("DEPTHSEARCH_BENCHMARKS", BENCHMARKS))


def load_jsonl(file: str, split: str = "test", **_metadata):
    """``{split: Dataset}`` of one JSON-lines file (HF ``json`` builder over an absolute path)."""
    import datasets

    path = Path(file) if Path(file).is_absolute() else benchmark_dir() / file
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path} (set DEPTHSEARCH_BENCHMARKS to its folder)")
    return datasets.load_dataset("json", data_files={split: str(path)})
