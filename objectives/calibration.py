"""Calibration and held-out token batches from local text/jsonl files or HF datasets, seeded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from objectives.text_source import DataError, TextSource  # noqa: F401 - part of this module's interface
from surgery.files import read_utf8


@dataclass(frozen=True)
class BatchSpec:
    """How many sequences of how many tokens, drawn with which seed."""

    source: TextSource
    num_sequences: int = 8
    seq_len: int = 256
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)


def read_text_file(path: Path) -> str:
    """A UTF-8 text file; errors name the file, and the line of an undecodable byte or a NUL (binary data)."""
    text = read_utf8(path, DataError, "text file")
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise DataError(f"{path}: line {line} holds a NUL byte: a binary file, not text")
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _jsonl_text(path: Path, text: str, text_field: str) -> str:
    """The ``text_field`` strings of a JSON-lines file, one after another with a blank line between."""
    return "\n\n".join(_jsonl_rows(path, text, text_field))


def _jsonl_rows(path: Path, text: str, text_field: str) -> list[str]:
    """The ``text_field`` string of each row of a JSON-lines file; errors name the file and the 1-based line."""
    parts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise DataError(f"{path}: line {number} is not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        if text_field not in row:
            raise DataError(f"{path}: line {number} has no field {text_field!r}")
        if not isinstance(row[text_field], str):
            raise DataError(f"{path}: line {number}: field {text_field!r} is {type(row[text_field]).__name__}, "
                            "expected a string")
        parts.append(row[text_field])
    return parts


def row_span(source: TextSource) -> tuple[int, int]:
    """(first, last) 0-based rows of a one-file JSON-lines source that its ``start``/``end`` slice reads (any
    other source: every row, conservatively)."""
    path = Path(source.files[0]) if len(source.files) == 1 else None
    if path is None or path.suffix != ".jsonl":
        return 0, 10**12
    parts = _jsonl_rows(path, read_text_file(path), source.field)
    total = sum(len(p) for p in parts) + 2 * max(len(parts) - 1, 0)
    begin, stop = int(total * source.start), int(total * source.end)
    first = last = None
    offset = 0
    for row, part in enumerate(parts):
        end = offset + len(part)
        if end > begin and offset < stop:
            first = row if first is None else first
            last = row
        offset = end + 2
    return (first or 0), (last if last is not None else 0)


def _read_file(path: Path, text_field: str) -> str:
    text = read_text_file(path)
    return _jsonl_text(path, text, text_field) if path.suffix == ".jsonl" else text


def _read_dataset(source: TextSource) -> str:
    try:
        import datasets  # heavy, optional: only for hub datasets

        data = datasets.load_dataset(source.dataset, source.dataset_config, split=source.split)
    except Exception as error:  # noqa: BLE001 - offline, unknown name, no such split: the user's to fix
        first = (str(error).strip().splitlines() or [""])[0]
        raise DataError(f"dataset {source.describe()}: cannot load ({type(error).__name__}: {first})") from None
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


def interleave(batches: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several ``[n_i, seq_len]`` batches, each part's rows spread evenly (equal parts: a, b, a, b, ...),
    so any first k rows, such as a staged selection's few sequences, hold every part in proportion; one batch
    comes back as it is."""
    if len(batches) == 1:
        return batches[0]
    order = sorted(((row / len(batch), part, row) for part, batch in enumerate(batches) for row in range(len(batch))))
    return torch.stack([batches[part][row] for _, part, row in order])


def mixed_batch(specs: list[BatchSpec], tokenizer) -> torch.Tensor:
    """One calibration batch from several text parts (e.g. two domains): each part's :func:`token_batch`,
    interleaved."""
    return interleave([token_batch(spec, tokenizer) for spec in specs])
