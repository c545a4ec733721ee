"""Held-out scoring: the perplexity of every strategy result, the validation candidates, part of the calibration
front and the dense model on each held-out set, cached in the study under a key of the text it was scored on."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from search.config import StudyConfig, heldout_sets, text_source
from search.record import PRIMARY_COLUMN, StudyRecord
from search.stored import StrategyRecord
from search.studydir import text_identity
from surgery.mask import KeepMask

HELDOUT_FRONT_POINTS = 32  # calibration-front masks scored on held-out text, spread evenly over size


def heldout_masks(record: StudyRecord, results: list[StrategyRecord], *, front: bool = True) -> list[str]:
    """The dense mask, every strategy result and (``front``) up to ``HELDOUT_FRONT_POINTS`` calibration-front masks."""
    masks = {str(KeepMask.dense(record.num_layers()))}
    for done in results:
        masks.update(done.masks())
    if front:
        points = record.front()
        step = max(1, -(-len(points) // HELDOUT_FRONT_POINTS))
        masks.update(point.mask for point in points[::step])
    return sorted(masks)


def heldout_scores(record: StudyRecord, config: StudyConfig, model, batches: dict[str, torch.Tensor],
                   results: list[StrategyRecord], *, progress=True, more: list[str] = ()) -> None:
    """Held-out perplexity on every held-out set (``batches``: report column -> tokens) of every strategy result, the
    validation candidates (``more``), the front and the dense model (cached)."""
    for held in heldout_sets(config):  # extra sets: no front masks
        masks = sorted({*heldout_masks(record, results, front=held.column == PRIMARY_COLUMN), *more})
        _score_heldout_set(record, config, model, held, batches[held.column], masks, progress)


def cache_key(spec) -> list:
    """What a held-out cache's perplexities depend on: the text (described and digested), windows and seed."""
    return [spec.source.describe(), spec.num_sequences, spec.seq_len, spec.seed, text_identity(spec)["sha256"]]


def _score_heldout_set(record: StudyRecord, config: StudyConfig, model, held, ids: torch.Tensor, masks: list[str],
                       progress: bool) -> None:
    from objectives.scorer import MaskScorer

    key = cache_key(text_source(config, held.section))
    cache = record.heldout_cache(held.column)
    if cache.get("spec") != key:
        cache = {"spec": key, "ppl": {}}
    todo = [m for m in masks if m not in cache["ppl"]]
    if todo:
        scorer = MaskScorer(model, ids, "ppl", batch_size=config.reference.batch_size)
        for mask in tqdm(todo, desc=f"{held.key} ppl", unit="mask", disable=not progress, leave=False):
            cache["ppl"][mask] = scorer.score(KeepMask.parse(mask))
            record.set_heldout_cache(held.column, cache)
