"""Training-free repair of a pruned model: one least-squares linear map per run of removed sublayers.

Sublayers are ordered A0, M0, A1, M1, ...; a run is a maximal stretch of removed ones. The kept sublayer just
before a run (its anchor) writes ``M`` into a residual stream ``R + M``; without the run the stream should have
become the dense model's ``X``. The map ``T`` minimises ``|M T - (X - R)|^2 + ridge |T - I|^2`` over calibration
tokens (ReplaceMe's fit), and is folded into the anchor's output projection (``W <- T^T W``, ``b <- b T``): no new
module, no new parameter, so every export format carries it unchanged. Runs are fitted in order, each on the model
with the earlier maps already folded, against dense targets computed once. Each layer's call arguments are recorded
once, so the fit runs layers directly: one walk up the pruned model, each run's layers run again after its fold.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import UserError
from .families import Family, family_for, get_path
from .formats import DEFAULT_RIDGE
from .mask import ATTN, KeepMask, sublayer_name
from .masking import masked


class RepairError(UserError):
    """A model or mask the linear repair cannot handle."""


@dataclass(frozen=True)
class Run:
    """Removed sublayers ``start .. end - 1``; ``anchor`` (= start - 1) is the kept sublayer before them."""

    start: int
    end: int

    @property
    def anchor(self) -> int:
        return self.start - 1


def removed_runs(mask: KeepMask) -> list[Run]:
    """Maximal runs of removed sublayers that follow a kept one (a run at the very start has no anchor)."""
    runs, start = [], None
    for index, keep in enumerate((*mask.bits, True)):
        if not keep and start is None:
            start = index
        elif keep and start is not None:
            if start > 0:
                runs.append(Run(start, index))
            start = None
    return runs


def out_projection(model: nn.Module, family: Family, sublayer: int) -> nn.Linear:
    """The nn.Linear sublayer ``sublayer`` ends in (its output is what the sublayer adds to the stream)."""
    layer, kind = divmod(sublayer, 2)
    path = family.attn_out if kind == ATTN else family.ffn_out
    if path is None or family.residual != "sequential":
        what = "attention" if kind == ATTN else "FFN"
        raise RepairError(f"linear repair needs the {what} of a {family.name} layer to end in a plain linear map "
                          "added to the residual stream; this family's does not")
    module = get_path(get_path(model, family.layers)[layer], path)
    if not isinstance(module, nn.Linear):
        raise RepairError(f"linear repair: {family.layers}.{layer}.{path} is a {type(module).__name__}, not nn.Linear")
    return module


@dataclass
class LinearRepair:
    """The fitted maps, by anchor sublayer index (of the unpruned model's numbering)."""

    mask: KeepMask
    maps: dict[int, torch.Tensor]
    fit_error: dict[int, tuple[float, float]]  # anchor -> (relative error before, after)


def _projections(model: nn.Module, family: Family, sublayers: set[int]) -> dict[int, nn.Linear]:
    """The output projections of ``sublayers``, resolved on the unmasked model (a stand-in has none)."""
    with masked(model, KeepMask.dense(len(get_path(model, family.layers)))):
        return {s: out_projection(model, family, s) for s in sublayers}


@contextmanager
def folded(model: nn.Module, repair: LinearRepair | None) -> Iterator[nn.Module]:
    """``model`` with ``repair``'s maps folded into its anchors' output projections; the weights are put back
    afterwards (``None``: the model as it is)."""
    family, saved = family_for(model.config), []
    maps = repair.maps if repair else {}
    projections = _projections(model, family, set(maps)) if maps else {}
    try:
        for anchor, t in maps.items():
            proj = projections[anchor]
            saved.append((proj, proj.weight.data, None if proj.bias is None else proj.bias.data))
            _fold(proj, t)
        yield model
    finally:
        for proj, weight, bias in reversed(saved):
            proj.weight.data = weight
            if bias is not None:
                proj.bias.data = bias


def _fold(proj: nn.Linear, t: torch.Tensor) -> None:
    """``proj``'s output times ``t``: W <- T^T W, b <- b T (new tensors, so saved originals stay intact)."""
    weight = proj.weight.data
    proj.weight.data = (t.T.to(torch.float64) @ weight.to(torch.float64)).to(weight.dtype)
    if proj.bias is not None:
        proj.bias.data = (proj.bias.data.to(torch.float64) @ t.to(torch.float64)).to(proj.bias.dtype)


# streams ------------------------------------------------------------------------------------------------------
class _Recorded(Exception):
    """Raised at the final norm once every layer's call is recorded (nothing past the layers is computed)."""


def _calls(model: nn.Module, family: Family, layers: nn.ModuleList, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The stream entering the first layer and each layer's other call arguments ``(args, kwargs)`` on ``ids``,
    recorded in a forward with every sublayer removed (position embeddings, attention masks, ... as the model's
    forward makes them, layer by layer: sliding-window layers get their own)."""
    calls, first = [None] * len(layers), []

    def recorder(index):
        def hook(module, args, kwargs):
            if not args:
                kwargs = dict(kwargs)
                args = (kwargs.pop("hidden_states"),)
            if index == 0:
                first.append(args[0])
            calls[index] = (tuple(args[1:]), dict(kwargs))
        return hook

    def halt(*_):
        raise _Recorded

    hooks = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hooks.append(get_path(model, family.final_norm).register_forward_pre_hook(halt))
    try:
        with masked(model, KeepMask((False,) * (2 * len(layers)))):
            model(input_ids=ids, use_cache=False)
    except _Recorded:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return first[0], calls


def _run(layers: nn.ModuleList, calls: list, hidden: torch.Tensor, start: int, stop: int,
         keep: set[int] = frozenset()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The stream entering layer ``stop`` (L: the last layer's output) from ``hidden`` entering layer ``start``,
    running layers start .. stop - 1 with their recorded calls; also the (flat) streams entering layers ``keep``."""
    kept = {}
    for index in range(start, stop + 1):
        if index in keep:
            kept[index] = _flat(hidden)
        if index < stop:
            args, kwargs = calls[index]
            out = layers[index](hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden, kept


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """tokens x hidden, as float32, without each sequence's first position."""
    return tensor[:, 1:].reshape(-1, tensor.shape[-1]).float()


@contextmanager
def _output(proj: nn.Linear) -> Iterator[list]:
    """A list that receives ``proj``'s output (flattened) on each call inside the block."""
    outputs = []
    hook = proj.register_forward_hook(lambda m, args, out: outputs.append(_flat(out)))
    try:
        yield outputs
    finally:
        hook.remove()


def _dense_streams(layers: nn.ModuleList, calls: list, hidden: torch.Tensor, projections: dict[int, nn.Linear],
                   boundaries: set[int]) -> dict[int, torch.Tensor]:
    """The stream entering each sublayer boundary in ``boundaries`` (2L: after the last layer), from ``hidden``
    entering the first layer; a mid-layer one is the layer's input plus its attention's output."""
    with ExitStack() as stack:
        attention = {b: stack.enter_context(_output(projections[b - 1])) for b in boundaries if b % 2}
        stop = max(b // 2 + b % 2 for b in boundaries)
        inputs = _run(layers, calls, hidden, 0, stop, {b // 2 for b in boundaries})[1]
    return {b: inputs[b // 2] + attention[b][0] if b % 2 else inputs[b // 2] for b in boundaries}


def _solve(m: torch.Tensor, residual: torch.Tensor, ridge: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_T sum_i w_i |m_i T - residual_i|^2 + lam |T - I|^2 with lam = ridge x mean diagonal of the weighted
    m^T m (float64)."""
    m64, r64 = m.double(), residual.double()
    if weight is not None:
        root = weight.double().sqrt()[:, None]
        m64, r64 = m64 * root, r64 * root
    gram = m64.T @ m64
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(gram + lam * eye, m64.T @ r64 + lam * eye).float()


def fit_linear_repair(model: nn.Module, mask: KeepMask | str, ids: torch.Tensor, *, ridge: float = DEFAULT_RIDGE,
                      per_token: str = "unit", dense_streams: dict[int, torch.Tensor] | None = None) -> LinearRepair:
    """Fit one map per removed run of ``mask`` on calibration tokens ``ids`` (batch x seq); ``model`` is unchanged.

    ``per_token="unit"`` weighs each token's error by 1 / |X|^2 (its dense stream's norm), so tokens with huge
    activations do not dominate and the fit approaches a cosine one; ``"l2"`` weighs all tokens alike.
    ``dense_streams``: a cache of the dense model's streams on ``ids`` by sublayer boundary, filled as needed and
    reused by later fits on the same model and ``ids`` (the same tensors a fit without it computes)."""
    family = family_for(model.config)
    layers = get_path(model, family.layers)
    mask = KeepMask.parse(mask, len(layers)) if isinstance(mask, str) else mask
    runs = removed_runs(mask)
    wanted = {run.anchor for run in runs} | {run.end - 1 for run in runs if run.end % 2}
    projections = _projections(model, family, wanted)  # refused here, before any forward
    repair = LinearRepair(mask, {}, {})
    if not runs:
        return repair
    cache = {} if dense_streams is None else dense_streams
    with torch.no_grad():
        hidden, calls = _calls(model, family, layers, ids)
        missing = {run.end for run in runs} - set(cache)
        if missing:
            with masked(model, KeepMask.dense(mask.num_layers)):  # the dense model, whatever mask a caller left applied
                cache.update(_dense_streams(layers, calls, hidden, projections, missing))
        # one walk up the masked model: from the stream entering each anchor's layer up to the run's end (the
        # input of layer end // 2: the run removed what lies between), then again from there with the map folded
        at = 0  # ``hidden`` enters layer ``at``
        with masked(model, mask), ExitStack() as folds:
            for run in runs:
                hidden, at = _run(layers, calls, hidden, at, run.anchor // 2)[0], run.anchor // 2
                with _output(projections[run.anchor]) as anchor_out:
                    stream = _flat(_run(layers, calls, hidden, at, run.end // 2)[0])
                m, target = anchor_out[0], cache[run.end]
                gap = target - stream
                weight = 1 / target.pow(2).sum(-1).clamp_min(1e-12) if per_token == "unit" else None
                t = _solve(m, gap + m, ridge, weight)
                before, after = gap.norm() / target.norm(), (gap + m - m @ t).norm() / target.norm()
                repair.maps[run.anchor], repair.fit_error[run.anchor] = t, (float(before), float(after))
                folds.enter_context(folded(model, LinearRepair(mask, {run.anchor: t}, {})))
    return repair


# the default calibration without a study (surgery.export): two bundled domains
DEFAULT_CALIBRATION = ("studies/assets/text/wikitext2_test.raw:0:0.5", "studies/assets/text/tinystories_valid.txt:0:0.8")


def fit_for_export(model: nn.Module, tokenizer, mask: KeepMask | str, calibration: Sequence | None = None, *,
                   sequences: int = 16, seq_len: int = 128, ridge: float = DEFAULT_RIDGE) -> LinearRepair:
    """The linear repair of ``mask`` fitted on ``sequences`` x ``seq_len`` tokens of each calibration text
    (a ``TextSource`` or ``PATH[:START:END]``; default the bundled texts), interleaved, with ``ridge``."""
    from objectives.calibration import BatchSpec, TextSource, mixed_batch

    from .fetch import ROOT

    texts = calibration or [str(ROOT / spec) for spec in DEFAULT_CALIBRATION]
    sources = [text if isinstance(text, TextSource) else TextSource.parse(text) for text in texts]
    specs = [BatchSpec(source, sequences, seq_len, seed=0) for source in sources]
    return fit_linear_repair(model, mask, mixed_batch(specs, tokenizer), ridge=ridge)


def describe(repair: LinearRepair) -> str:
    """One line for a model card: where the maps were folded and how much of the stream error they removed."""
    fits = ", ".join(f"after {sublayer_name(a)}: {b:.3f} -> {c:.3f}" for a, (b, c) in sorted(repair.fit_error.items()))
    return f"linear, {len(repair.maps)} map(s) folded (relative stream error {fits or 'none'})"
