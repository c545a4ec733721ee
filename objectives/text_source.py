"""Where text comes from, as one pydantic model: the study config's text sections, ``confirm.heal.corpus`` and the
calibration code all read this schema. Light to import (no torch), so reading a config stays fast."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from surgery.errors import UserError


class DataError(UserError):
    """Text that cannot be loaded or is too short for the batch asked of it."""


class TextSource(BaseModel):
    """Where text comes from: local files (.txt or .jsonl with ``field``) or an HF dataset name. The one text-source
    schema: the study config's text sections and ``confirm.heal.corpus`` are this model (plus their batch sizes).

    ``start``/``end`` select a fraction of the characters, so calibration and held-out text can be disjoint
    slices of one file.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    files: tuple[str, ...] = ()  # local .txt / .jsonl
    dataset: str | None = None  # HF dataset name (for users with a hub)
    dataset_config: str | None = None
    split: str = "train"
    field: str = "text"  # the JSON-lines / dataset column holding the text
    start: float = Field(0.0, ge=0.0, le=1.0)  # fraction of the characters where the slice starts
    end: float = Field(1.0, ge=0.0, le=1.0)

    @classmethod
    def parse(cls, spec: str) -> "TextSource":
        """``PATH`` or ``PATH:START:END`` (fractions of the file's characters) as a source of that slice."""
        path, start, end = spec, 0.0, 1.0
        head, *cut = spec.rsplit(":", 2)
        if len(cut) == 2:
            try:
                path, start, end = head, float(cut[0]), float(cut[1])
            except ValueError:
                pass
        if not 0 <= start < end <= 1:
            raise DataError(f"text {spec!r}: START:END must be fractions with 0 <= START < END <= 1")
        return cls(files=(path,), start=start, end=end)

    def describe(self) -> str:
        where = ",".join(self.files) if self.files else f"{self.dataset}:{self.dataset_config or ''}:{self.split}"
        return f"{where}[{self.start:g}:{self.end:g}]"
