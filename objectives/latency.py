"""Latency model: per-sublayer prefill and decode cost on the target device, stored with the study.

One profiled forward is cut into a timeline by hooks: a layer's attention sublayer runs from the layer's start
to the start of its FFN sublayer (the FFN's first norm or module), the FFN sublayer from there to the layer's
end; everything outside the layers (embedding, mask/rotary set-up, final norm, head) is the fixed cost. The
segments add up to the forward's time by construction, so the additive model ``fixed + sum of kept
sublayers`` is exact for the dense model; a physically pruned model simply lacks the removed segments.
Each segment is the median over repeats (after warm-up), then all are scaled so they add up to the median
un-hooked forward time: the hooks' own overhead does not count. CPU stamps use ``time.perf_counter``; CUDA stamps are CUDA events.

Phases: ``prefill`` (``batch_size x seq_len`` tokens, no cache) and ``decode`` (one new token per sequence
for ``decode_batch_size`` sequences, on a KV cache holding ``context`` tokens).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from surgery.compat import forward_with_cache, output_cache
from surgery.errors import UserError
from surgery.families import family_for, get_path
from surgery.files import atomic_write_text
from surgery.mask import KeepMask
from surgery.masking import masked

from .costs import CostTable

PHASES = ("prefill", "decode")


class LatencyError(UserError):
    """Bad latency settings, an unknown phase, or a profile that does not fit the model."""


BATCH_MAX, TOKENS_MAX, REPEATS_MAX = 4096, 1 << 20, 100_000  # every setting has a range (as in search.config)


class LatencySettings(BaseModel):
    """The config's ``latency:`` mapping (every key optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(1, ge=1, le=BATCH_MAX)  # prefill sequences
    seq_len: int = Field(128, ge=1, le=TOKENS_MAX)  # prefill tokens per sequence
    context: int = Field(256, ge=1, le=TOKENS_MAX)  # decode: tokens already in the KV cache
    decode_batch_size: int = Field(1, ge=1, le=BATCH_MAX)
    warmup: int = Field(2, ge=0, le=REPEATS_MAX)
    repeats: int = Field(7, ge=1, le=REPEATS_MAX)
    decode_steps: int = Field(8, ge=1, le=REPEATS_MAX)  # decode steps per timed repeat (one alone is too short)
    profile: str | None = None  # JSON file holding the profile (reused when it matches model and settings)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None = None, **overrides: Any) -> LatencySettings:
        """Validate ``mapping`` (e.g. the config's ``latency:``); errors name each bad key and value."""
        values = {**dict(mapping or {}), **overrides}
        try:
            return cls(**values)
        except ValidationError as error:
            problems = [
                f"latency.{'.'.join(str(p) for p in item['loc'])}: {item['msg']} (got {item.get('input')!r})"
                for item in error.errors()
            ]
            raise LatencyError("; ".join(problems)) from None

    def steps(self, phase: str) -> int:
        """Forward calls per timed repeat: 1 for prefill, ``decode_steps`` for decode."""
        return self.decode_steps if phase == "decode" else 1

    def shape(self, phase: str) -> dict[str, int]:
        """The input shape a phase is profiled at (part of what a stored profile must match)."""
        check_phase(phase)
        if phase == "prefill":
            return {"batch_size": self.batch_size, "seq_len": self.seq_len}
        return {"batch_size": self.decode_batch_size, "context": self.context}


def check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise LatencyError(f"unknown latency phase {phase!r}; choose one of {', '.join(PHASES)}")


# clocks ------------------------------------------------------------------------------------------------------
class _CpuClock:
    def stamp(self) -> float:
        return time.perf_counter()

    def ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3

    def sync(self) -> None:
        pass


class _CudaClock:
    def stamp(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def sync(self) -> None:
        torch.cuda.synchronize()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def clock_for(device: torch.device):
    return _CudaClock() if device.type == "cuda" else _CpuClock()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


# inputs ------------------------------------------------------------------------------------------------------
def _vocab(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[0]


def phase_runner(model: nn.Module, phase: str, settings: LatencySettings) -> Callable[[], Any]:
    """A no-argument function running one forward of ``phase`` on fixed, seeded inputs."""
    check_phase(phase)
    device, vocab = model_device(model), _vocab(model)
    generator = torch.Generator().manual_seed(settings.seed)
    if phase == "prefill":
        ids = torch.randint(vocab, (settings.batch_size, settings.seq_len), generator=generator).to(device)
        return lambda: model(input_ids=ids, use_cache=False)
    context = torch.randint(vocab, (settings.decode_batch_size, settings.context), generator=generator).to(device)
    step = torch.randint(vocab, (settings.decode_batch_size, 1), generator=generator).to(device)
    with torch.inference_mode():
        cache = output_cache(model(input_ids=context, use_cache=True))
    if hasattr(cache, "activate_past_recording"):  # sliding-window layers can then be cropped back
        cache.activate_past_recording()

    def decode():
        out = forward_with_cache(model, cache, input_ids=step)
        cache.crop(-1)  # drop the new token: the next repeat sees the same cache length
        return out

    return decode


def interleaved_ms(
    runners: Mapping[str, Callable[[], Any]], *, warmup: int, repeats: int, device, steps: int = 1
) -> dict[str, float]:
    """Median milliseconds per call of each runner; each repeat times ``steps`` calls, round-robin over the
    runners (side by side) so that drift in the machine's load hits all of them alike.

    Each timed block follows one untimed call of the same runner, so every runner is timed with its weights
    and cache warm, as when it serves alone (and as the profile times it), not cold from its neighbours.
    """
    clock = clock_for(torch.device(device))
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name, run in runners.items():
                run()
                clock.sync()
                start = clock.stamp()
                for _ in range(steps):
                    run()
                end = clock.stamp()
                clock.sync()
                if round_index >= warmup:
                    times[name].append(clock.ms(start, end) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


# the timeline profile -----------------------------------------------------------------------------------------
class _Timeline:
    """Hooks that stamp model start/end, each layer's start/end and each FFN sublayer's start."""

    def __init__(self, model: nn.Module, clock):
        family = family_for(model.config)
        self.layers = list(get_path(model, family.layers))
        self.clock = clock
        self.stamps: dict[tuple[str, int], Any] = {}
        self.handles = [
            model.register_forward_pre_hook(self._at("start", -1)),
            model.register_forward_hook(self._at("end", -1)),
        ]
        first_ffn = (family.ffn_norms + family.ffn)[0]
        for index, layer in enumerate(self.layers):
            self.handles += [
                layer.register_forward_pre_hook(self._at("layer", index)),
                getattr(layer, first_ffn).register_forward_pre_hook(self._at("ffn", index)),
                layer.register_forward_hook(self._at("layer_end", index)),
            ]

    def _at(self, what: str, index: int):
        def hook(*_args):
            self.stamps[(what, index)] = self.clock.stamp()

        return hook

    def segments(self) -> tuple[float, list[float]]:
        """(total ms, [attn_0, ffn_0, attn_1, ...] ms) of the last forward."""
        ms, s = self.clock.ms, self.stamps
        per: list[float] = []
        for i in range(len(self.layers)):
            per += [ms(s[("layer", i)], s[("ffn", i)]), ms(s[("ffn", i)], s[("layer_end", i)])]
        return ms(s[("start", -1)], s[("end", -1)]), per

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class PhaseProfile:
    """One phase's profile: fixed and per-sublayer milliseconds (already scaled to un-hooked time)."""

    phase: str
    shape: dict[str, int]
    fixed_ms: float
    per_sublayer_ms: list[float]
    dense_ms: float  # median forward time without hooks
    hooked_ms: float  # median forward time with the timeline hooks
    repeats: int
    warmup: int

    def table(self) -> CostTable:
        return CostTable(f"latency_{self.phase}_ms", "ms", self.fixed_ms, tuple(self.per_sublayer_ms))


def profile_phase(model: nn.Module, phase: str, settings: LatencySettings) -> PhaseProfile:
    """Profile the dense model for one phase: hooked timeline repeats, then un-hooked repeats for the scale."""
    device = model_device(model)
    clock = clock_for(device)
    num_layers = len(get_path(model, family_for(model.config).layers))
    with torch.inference_mode(), masked(model, KeepMask.dense(num_layers)):
        run = phase_runner(model, phase, settings)
        timeline = _Timeline(model, clock)
        totals, rows = [], []
        try:
            steps = settings.steps(phase)
            for index in range(settings.warmup + settings.repeats * steps):
                run()
                clock.sync()
                total, per = timeline.segments()
                if index >= settings.warmup:
                    totals.append(total)
                    rows.append(per)
        finally:
            timeline.remove()
        dense_ms = interleaved_ms(
            {"dense": run}, warmup=settings.warmup, repeats=settings.repeats, device=device, steps=steps
        )
    return _scaled(phase, settings, totals, rows, dense_ms["dense"])


def _scaled(phase, settings, totals, rows, dense_ms) -> PhaseProfile:
    """Median of every segment (fixed = the forward outside the sublayers), scaled to the un-hooked median.

    Scaling rather than subtracting spreads the hooks' overhead, and on a shared CPU the time lost to other
    processes, over the segments in proportion to their length, which is how both accrue.
    """
    per = [statistics.median(column) for column in zip(*rows)]
    fixed = statistics.median(total - sum(row) for total, row in zip(totals, rows))
    scale = dense_ms / (fixed + sum(per))
    return PhaseProfile(
        phase, settings.shape(phase), fixed * scale, [p * scale for p in per], dense_ms,
        statistics.median(totals), settings.repeats, settings.warmup,
    )


@dataclass
class LatencyProfile:
    """Profiles of one model on one device, per phase; saved as JSON next to the study."""

    model: dict[str, Any]
    device: str
    phases: dict[str, PhaseProfile] = field(default_factory=dict)

    def table(self, phase: str) -> CostTable:
        check_phase(phase)
        if phase not in self.phases:
            raise LatencyError(f"the latency profile has no {phase!r} phase (has: {', '.join(self.phases) or 'none'})")
        return self.phases[phase].table()

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "phases": {k: asdict(v) for k, v in self.phases.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatencyProfile:
        phases = {name: PhaseProfile(**value) for name, value in data.get("phases", {}).items()}
        return cls(dict(data["model"]), str(data["device"]), phases)

    def save(self, path: str | Path) -> Path:
        """Atomic write (temp file + rename)."""
        return atomic_write_text(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency profile not found: {path}")
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise LatencyError(f"{path}: not a latency profile ({error})") from None


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What a stored profile must match: architecture, depth, widths, dtype."""
    config = model.config
    return {
        "name": str(getattr(config, "_name_or_path", "") or ""),
        "model_type": config.model_type,
        "num_layers": len(get_path(model, family_for(config).layers)),
        "hidden_size": getattr(config, "hidden_size", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def profile_model(model: nn.Module, settings: LatencySettings, phases=PHASES) -> LatencyProfile:
    profile = LatencyProfile(model_signature(model), device_name(model_device(model)))
    for phase in phases:
        profile.phases[phase] = profile_phase(model, phase, settings)
    return profile


def _reusable(profile: LatencyProfile, model: nn.Module, phase: str, settings: LatencySettings) -> bool:
    stored = profile.phases.get(phase)
    return (
        stored is not None
        and profile.model == model_signature(model)
        and profile.device == device_name(model_device(model))
        and stored.shape == settings.shape(phase)
    )


def profile_for(model: nn.Module, phase: str, settings: LatencySettings) -> LatencyProfile:
    """The profile holding ``phase``: loaded from ``settings.profile`` when it matches, else measured (and saved)."""
    path = Path(settings.profile) if settings.profile else None
    profile = LatencyProfile.load(path) if path and path.is_file() else model.__dict__.get(_MEMO)
    if profile is not None and _reusable(profile, model, phase, settings):
        if path and not path.is_file():
            profile.save(path)  # measured before the study directory existed
        return profile
    if profile is None or profile.model != model_signature(model) or profile.device != device_name(model_device(model)):
        profile = LatencyProfile(model_signature(model), device_name(model_device(model)))
    profile.phases[phase] = profile_phase(model, phase, settings)
    model.__dict__[_MEMO] = profile
    if path:
        profile.save(path)
    return profile


_MEMO = "_depthsearch_latency_profile"  # the last profile measured on a model, reused within one process


PROFILE_FILE = "latency_profile.json"


def latency_costs(
    model: nn.Module, phase: str, settings: Mapping[str, Any] | LatencySettings | None = None, *,
    study_dir: str | Path | None = None, **overrides: Any,
) -> CostTable:
    """CostTable ``latency_{phase}_ms`` of ``model``; ``settings``: the config's ``latency:`` mapping.

    The profile is kept in ``settings.profile``, else in ``study_dir/latency_profile.json`` when a study
    directory is given, and reused while model, device and input shape match.
    """
    if isinstance(settings, LatencySettings):
        settings = settings.model_dump()
    resolved = LatencySettings.from_mapping(settings, **overrides)
    if resolved.profile is None and study_dir is not None:
        resolved = resolved.model_copy(update={"profile": str(Path(study_dir) / PROFILE_FILE)})
    return profile_for(model, phase, resolved).table(phase)


def latency_prefill_costs(model: nn.Module, settings=None, **kwargs: Any) -> CostTable:
    """Budget ``latency_prefill_ms``: measured prefill milliseconds, additive over kept sublayers."""
    return latency_costs(model, "prefill", settings, **kwargs)


def latency_decode_costs(model: nn.Module, settings=None, **kwargs: Any) -> CostTable:
    """Budget ``latency_decode_ms``: milliseconds of one decode step on a ``context``-token KV cache."""
    return latency_costs(model, "decode", settings, **kwargs)


def prefill_flop_costs(model: nn.Module, *, batch_size: int = 1, seq_len: int = 128) -> CostTable:
    """Analytic prefill FLOPs (2 per multiply-add) of linear layers and attention scores; the head is fixed."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    family = family_for(model.config)
    tokens = batch_size * seq_len
    layers = get_path(model, family.layers)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per: list[float] = []
    for layer in layers:
        attn = getattr(layer, family.attn)
        ffn = [getattr(layer, name) for name in family.ffn]
        scores = 2 * 2 * batch_size * heads * head_dim * seq_len * seq_len  # QK^T and PV
        per += [_linear_flops([attn], tokens) + scores, _linear_flops(ffn, tokens)]
    head = model.get_output_embeddings()
    return CostTable("flops_prefill", "FLOP", float(_linear_flops([head], tokens)), tuple(float(p) for p in per))


def _linear_flops(modules, tokens: int) -> int:
    return sum(
        2 * tokens * m.weight.numel() for module in modules for m in module.modules() if isinstance(m, nn.Linear)
    )
