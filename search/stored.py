"""The shapes of what a study stores, checked when ``search.record`` reads them back: the run metadata, strategy
records, held-out and validation caches, trial attributes and writer claims. A damaged study is one message naming the study
and the attribute, never a traceback further on."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from surgery.mask import KeepMask

Number = StrictInt | StrictFloat
HEARTBEAT_S, STALE_S = 10.0, 60.0  # a claim's heartbeat period; a claim from another host this old is dead


class _Stored(BaseModel):
    model_config = ConfigDict(extra="allow")


class StudyMeta(_Stored):
    """The study attr ``meta``: what ``run`` recorded about the study (model, objective, budget, dense costs)."""

    fingerprint: dict[str, Any]
    model: StrictStr
    objective: StrictStr
    budget_metric: StrictStr
    targets: list[Number]
    num_layers: Annotated[StrictInt, Field(ge=1, le=1_000_000)]
    dense: dict[StrictStr, Number]
    units: dict[StrictStr, StrictStr] = {}
    strategies: list[StrictStr] = []
    dense_objective: Number | None = None


class StrategyRecord(_Stored):
    """A ``strategy:<tag>`` study attr: one strategy's settings, results and counters."""

    name: StrictStr
    settings: dict[str, Any] = {}
    done: StrictBool = False
    results: dict[StrictStr, StrictStr | None] = {}
    evaluations: StrictInt | None = None
    forwards: StrictInt | None = None
    wall_s: Number | None = None
    notes: list[StrictStr] = []

    def masks(self) -> list[str]:
        """Every mask this strategy returned, in target order (None results left out)."""
        return [mask for mask in self.results.values() if mask]


class HeldoutCache(_Stored):
    """A ``heldout`` / ``heldout:<name>`` study attr: held-out perplexity per mask."""

    spec: list[Any] = []
    ppl: dict[StrictStr, Number] = {}


class ValidationCache(_Stored):
    """The ``validation`` study attr: candidates per target and their per-window values on each domain."""

    spec: list[Any] = []
    criterion: StrictStr = "ppl"
    reduce: StrictStr = "mean"
    pool: dict[StrictStr, list[StrictStr]] = {}
    windows: dict[StrictStr, dict[StrictStr, list[Number]]] = {}
    wall_s: Number = 0.0


class TrialAttrs(_Stored):
    """The attrs of one evaluated mask (a COMPLETE trial of the main study)."""

    strategy: StrictStr | None
    mask: StrictStr
    target: Number | None = None
    removed_attn: StrictInt
    removed_ffn: StrictInt


def shape_problem(shape: type[BaseModel], value) -> str | None:
    """Why ``value`` does not have ``shape`` (the first problem, with its key), or None."""
    if not isinstance(value, dict):
        return f"expected a mapping, got {type(value).__name__} {_shown(value)}"
    try:
        shape.model_validate(value)
    except ValidationError as error:
        item = error.errors()[0]
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        return f"{key}: {item['msg']} (got {_shown(item.get('input'))})"
    return None


def mask_problem(mask, sublayers: int) -> str | None:
    """Why ``mask`` is not a stored mask of a model with ``sublayers`` sublayers."""
    try:
        bits = KeepMask.parse(mask).bits
    except (ValueError, TypeError, AttributeError) as error:
        return f"mask {_shown(mask)} does not parse ({error})"
    return None if len(bits) == sublayers else f"mask {mask!r} has {len(bits)} sublayers, the study's model {sublayers}"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Writer:
    """A writer claim read back: which run (command, pid, host, output directory), since when, last heartbeat."""

    number: int
    token: str
    command: str
    pid: int
    host: str
    output_dir: str
    since: str
    heartbeat: float

    @classmethod
    def read(cls, number: int, attrs: dict) -> Writer | None:
        """The claim of trial ``number``; None when its attrs are damaged (such a claim counts as dead)."""
        try:
            return cls(number, str(attrs["token"]), str(attrs["command"]), int(attrs["pid"]), str(attrs["host"]),
                       str(attrs.get("output_dir", "")), str(attrs["since"]), float(attrs["heartbeat"]))
        except (KeyError, TypeError, ValueError):
            return None

    def alive(self, now: float) -> bool:
        """Same host: its process exists; another host: a heartbeat within ``STALE_S``."""
        from surgery.files import pid_alive

        return pid_alive(self.pid) if self.host == socket.gethostname() else now - self.heartbeat < STALE_S

    def describe(self) -> str:
        where = f", output_dir {self.output_dir}" if self.output_dir else ""
        return f"`{self.command}` (pid {self.pid} on {self.host}, since {self.since}{where})"
