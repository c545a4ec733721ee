"""The transformers compatibility layer (surgery/compat.py) on the installed release.

Checked on transformers 5.0.0 (the oldest release pyproject.toml allows), 5.24.0 and 5.25.0 (the lock): CI runs
this file, the masking tests and the export tests on the lock, on the newest releases the ranges allow and on the
oldest, so a release that renames the cache again fails here, naming the package.
"""

from __future__ import annotations

import inspect

import optuna
import pytest
import torch
import transformers

from surgery.compat import CACHE_NAMES, _cache_argument, forward_with_cache, output_cache
from surgery.mask import KeepMask
from surgery.masking import masked
from tests.families import input_ids


def test_every_family_takes_the_cache_under_a_known_name(case, tiny):
    model = tiny(case)
    name = _cache_argument(type(model))
    assert name in inspect.signature(type(model).forward).parameters, (
        f"transformers {transformers.__version__}: {type(model).__name__}.forward takes none of {CACHE_NAMES}; "
        "surgery/compat.py must learn the new name")


@pytest.mark.parametrize("mask", ["AM,AM,AM", "-M,A-,--", "--,-M,AM"])
def test_one_decode_step_from_the_cache_equals_the_full_forward(tiny, mask):
    model = tiny("llama")
    ids = input_ids(batch=2, seq=7)
    with torch.no_grad(), masked(model, KeepMask.parse(mask)):
        full = model(input_ids=ids, use_cache=False).logits[:, -1]
        cache = output_cache(model(input_ids=ids[:, :-1], use_cache=True))
        assert cache.get_seq_length() == 6
        step = forward_with_cache(model, cache, input_ids=ids[:, -1:]).logits[:, -1]
        assert cache.get_seq_length() == 7
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: optuna.samplers.NSGAIISampler(seed=3, population_size=4),
                                  lambda: optuna.samplers.TPESampler(seed=3), lambda: optuna.samplers.RandomSampler(seed=3)])
def test_samplers_pickle_for_ray_tune(make):
    """Ray Tune pickles its search algorithm with the sampler; optuna 5.1's NSGA-II holds a thread lock."""
    ray_pickle = pytest.importorskip("ray.cloudpickle", reason="the ray extra is not installed")
    from search.evaluation.tune import picklable

    sampler = picklable(make())
    copy = ray_pickle.loads(ray_pickle.dumps(sampler))
    assert type(copy) is type(sampler)
    assert copy._rng.rng.random() == sampler._rng.rng.random()  # the same seeded stream, state and all
