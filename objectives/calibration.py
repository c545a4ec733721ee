"""Calibration and held-out token batches from local text/jsonl files or HF datasets, seeded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from surgery.errors import UserError


class DataError(UserError):
    """Text that cannot be loaded or is too short for the batch asked of it."""


@dataclass(frozen=True)
class TextSource:
    """Where text comes from: local files (.txt or .jsonl with ``field``) or an HF dataset name.

    ``start``/``end`` select a fraction of the characters, so calibration and held-out text can be disjoint
    slices of one file.
    """

    files: tuple[str, ...] = ()
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    field: str = "text"
    start: float = 0.0
    end: float = 1.0

    def describe(self) -> str:
        where = ",".join(self.files) if self.files else f"{self.dataset}:{self.dataset_config or ''}:{self.split}"
        return f"{where}[{self.start:g}:{self.end:g}]"


@dataclass(frozen=True)
class BatchSpec:
    """How many sequences of how many tokens, drawn with which seed."""

    source: TextSource
    num_sequences: int = 8
    seq_len: int = 256
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)


def _read_file(path: Path, text_field: str) -> str:
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [i for i, row in enumerate(rows) if text_field not in row]
        if missing:
            raise DataError(f"{path}: row {missing[0]} has no field {text_field!r}")
        return "\n\n".join(str(row[text_field]) for row in rows)
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def _read_dataset(source: TextSource) -> str:
    import datasets  # heavy, optional: only for hub datasets

    data = datasets.load_dataset(source.dataset, source.dataset_config, split=source.split)
    if source.field not in data.column_names:
        raise DataError(f"dataset {source.dataset!r} has no column {source.field!r}; columns: {data.column_names}")
    return "\n\n".join(t for t in data[source.field] if t)


def load_text(source: TextSource) -> str:
    """The selected characters of a source."""
    if not source.files and not source.dataset:
        raise DataError("a text source needs `files` or `dataset`")
    if not 0.0 <= source.start < source.end <= 1.0:
        raise DataError(f"text slice [{source.start}, {source.end}] must satisfy 0 <= start < end <= 1")
    if source.files:
        text = "\n\n".join(_read_file(Path(f), source.field) for f in source.files)
    else:
        text = _read_dataset(source)
    begin, stop = int(len(text) * source.start), int(len(text) * source.end)
    text = text[begin:stop]
    if not text.strip():
        raise DataError(f"no text in {source.describe()}")
    return text


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """One long token stream of ``text`` (documents split on blank lines, each starting with BOS if any)."""
    docs = [d for d in text.split("\n\n") if d.strip()]
    ids = tokenizer(docs, add_special_tokens=True)["input_ids"]
    return torch.tensor([tok for doc in ids for tok in doc], dtype=torch.long)


def token_batch(spec: BatchSpec, tokenizer) -> torch.Tensor:
    """``[num_sequences, seq_len]`` windows at seeded random, non-overlapping offsets of the token stream."""
    stream = tokenize(load_text(spec.source), tokenizer)
    windows = len(stream) // spec.seq_len
    if windows < spec.num_sequences:
        raise DataError(
            f"{spec.source.describe()} has {len(stream)} tokens: too few for {spec.num_sequences} sequences "
            f"of {spec.seq_len} tokens"
        )
    generator = torch.Generator().manual_seed(spec.seed)
    chosen = torch.randperm(windows, generator=generator)[: spec.num_sequences].sort().values
    return torch.stack([stream[i * spec.seq_len : (i + 1) * spec.seq_len] for i in chosen.tolist()])
