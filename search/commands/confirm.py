"""``confirm``: measure the front's best masks (or masks from a CSV) as pruned, repaired and healed models.

    python -m search.study confirm runs/tinystories_l12 --budgets 0.3 --tasks tinystories_ppl tinystories_next
    python -m search.study confirm runs/smollm2-confirm --config studies/smollm2-135m.yaml --masks masks.csv

For each candidate mask the variants of ``search/commands/variants.py`` (pruned, LoRA-healed and, with
``confirm.repair: linear``, repaired and repaired+LoRA) are benchmarked with lm-eval (value and standard error),
scored on the study's held-out texts and exported. The dense model is measured once per evaluation setting.
Settings come from the study config's ``confirm:`` mapping (or ``--config``). Results go to
``STUDY_DIR/confirm/``: ``confirm.csv``, ``confirm.md``, ``confirm.png`` and one folder per candidate holding
``result.json``, one record per variant and the exports; work measured with the current settings is not redone,
and a failing candidate is reported while the others go on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import traceback
from pathlib import Path

from search.config import StudyConfig, calibration_sources, load_config, model_source, resolve
from objectives.text_source import TextSource
from search.confirm_settings import ConfirmSettings, confirm_settings
from search.commands.confirm_candidates import (  # noqa: F401 - part of confirm's interface
    Candidate, ConfirmError, pick_candidates, read_masks, study_front,
)
from surgery.files import atomic_write_text
from surgery.errors import UserError

OUT_DIR = "confirm"


def corpus_sources(config: StudyConfig, section: TextSource | None) -> list[TextSource]:
    """The healing TextSources: the corpus section (files relative to the config, else cwd), or every
    calibration part (``calibration`` and each ``extra_calibration``)."""
    from objectives.calibration import DataError

    if section is None:
        return calibration_sources(config)
    files = []
    for name in section.files:
        tried = [Path(resolve(config, name)), Path(name)]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            raise DataError(f"confirm.heal.corpus.files: {name!r} not found (tried {', '.join(map(str, tried))})")
        files.append(str(found.resolve()))
    return [section.model_copy(update={"files": tuple(files)})]


# running the candidates ------------------------------------------------------------------------------------
def run_candidate(cand: Candidate, ctx, out: Path, fingerprint: str, progress: bool) -> dict:
    """Every variant of one candidate (each reused when already measured with these settings); the record."""
    from search.commands.variants import CandidateModels, run_variant, wanted
    from surgery.export import num_params
    from surgery.mask import KeepMask

    models = CandidateModels(ctx, KeepMask.parse(cand.mask))
    chosen = ctx.settings.chosen()
    variants = {v: run_variant(models, v, out, progress) for v in wanted(ctx.settings.repair)
                if v in chosen or (out / f"{v}.json").is_file()}
    return {"candidate": cand.__dict__, "name": cand.name, "fingerprint": fingerprint, "status": "ok",
            "params": num_params(models.pruned()), "dense_params": num_params(ctx.dense), "variants": variants}


def _load_done(path: Path, fingerprint: str, variants: list[str] = ()) -> dict | None:
    """A finished record with this fingerprint holding at least ``variants``, else None."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    ok = record.get("fingerprint") == fingerprint and record.get("status") == "ok"
    return record if ok and set(variants) <= set(record.get("variants", {})) else None


def dense_scores(ctx, out: Path, fingerprint: str, progress: bool) -> dict:
    """The dense model's benchmarks and held-out perplexities, measured once per evaluation fingerprint
    (``dense-<fingerprint>.json``: healing and repair settings do not change them); empty when not measured yet
    and not chosen."""
    from search.commands.variants import measure

    path = out / f"dense-{fingerprint}.json"
    done = _load_done(path, fingerprint)
    if done or "dense" not in ctx.settings.chosen():
        return done or {"scores": {}, "heldout_ppl": {}}
    record = {"fingerprint": fingerprint, "status": "ok", **measure(ctx.dense, ctx, progress)}
    atomic_write_text(path, json.dumps(record, indent=1))
    return record


# command ---------------------------------------------------------------------------------------------------
def load_settings(args: argparse.Namespace, config: StudyConfig) -> ConfirmSettings:
    """The confirm settings of the study (or --config), with the command-line overrides applied."""
    if args.config:
        other = load_config(args.config)
        config.confirm, config.source = other.confirm, other.source
    settings = confirm_settings(config)
    overrides = {"tasks": args.tasks, "limit": args.limit, "top_k": args.top, "budgets": args.budgets,
                 "variants": args.variants}
    data = settings.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    data["limits"] = data["limits"] | task_limits(args.limits or [])
    if args.steps is not None:
        data["heal"]["steps"] = args.steps
    config.confirm = data
    return confirm_settings(config)


def task_limits(items: list[str]) -> dict[str, int | None]:
    """``--limits TASK=N`` (or ``TASK=all``) as a ``confirm.limits`` mapping."""
    limits = {}
    for item in items:
        task, _, count = item.partition("=")
        if not task or not (count == "all" or count.isdigit() and int(count) > 0):
            raise ConfirmError(f"--limits {item!r}: expected TASK=N with N a positive number of rows, or TASK=all")
        limits[task] = None if count == "all" else int(count)
    return limits


def main(args: argparse.Namespace) -> int:
    from objectives.benchmarks import check_tasks

    from search.checks import device_problem
    from search.studydir import StudyLock, study_model

    study_dir = Path(args.study_dir)
    study, config = open_study(study_dir, args)
    settings = load_settings(args, config)
    check_tasks(settings.tasks)
    problem = device_problem(f"{config.source}: model.device", config.model.device)
    if problem:
        raise ConfirmError(problem)
    calibration = repair_texts(config, settings)
    if args.masks:
        candidates = read_masks(Path(args.masks), num_layers(config))
    else:
        front, size = study_front(study)
        candidates = pick_candidates(front, size, top_k=settings.top_k, budgets=settings.budgets)
    sources = corpus_sources(config, settings.heal.corpus)
    if study is not None:
        _, trust = study_model(study_dir, config, study.record.meta(), trust_remote_code=args.trust_remote_code)
    elif config.model.trust_remote_code and not args.trust_remote_code:
        raise ConfirmError(f"{config.source} sets model.trust_remote_code: true; pass --trust-remote-code to allow it")
    else:
        trust = bool(config.model.trust_remote_code)
    study_dir.mkdir(parents=True, exist_ok=True)  # everything is checked: from here on, results are written
    with StudyLock(study_dir, "python -m search.study confirm"):
        return confirm(study_dir, config, settings, candidates, sources, progress=not args.no_progress,
                       trust_remote_code=trust, calibration=calibration, threads=args.threads)


def open_study(study_dir: Path, args: argparse.Namespace):
    """(study, config): the study in ``study_dir`` (:class:`search.studydir.Study`, opened once) and its config;
    or, with ``--masks`` and ``--config`` and no study there, (None, the ``--config`` file) with results written
    under ``study_dir``."""
    from search import studydir

    if not args.masks or (study_dir / "config.yaml").is_file():
        study = studydir.open_study(study_dir)
        return study, study.config
    if not args.config:
        raise ConfirmError(f"{study_dir} holds no study (no config.yaml): with --masks, name the study config whose "
                           "model, held-out text and confirm: settings to use with --config")
    if study_dir.exists() and not study_dir.is_dir():
        raise ConfirmError(f"{study_dir} is not a directory: name a folder for the results")
    return None, load_config(args.config)


def num_layers(config: StudyConfig) -> int:
    """The decoder layers of the config's model, read from its config (no weights loaded)."""
    from surgery.load import load_model_config

    name, _ = model_source(config)
    try:
        return int(load_model_config(name, trust_remote_code=False).num_hidden_layers)
    except UserError:
        raise
    except (OSError, ValueError, AttributeError) as error:
        raise ConfirmError(f"{config.source}: model.name: cannot read the config of {name} ({error})") from None


def repair_texts(config: StudyConfig, settings: ConfirmSettings) -> list[TextSource]:
    """The texts the linear repair is fitted on: ``confirm.repair_calibration`` (``PATH[:START:END]``, each file
    found relative to the config, else the working directory), else every calibration part of the study."""
    from objectives.calibration import DataError

    if not settings.repair_calibration:
        return calibration_sources(config)
    texts = []
    for spec in settings.repair_calibration:
        try:
            source = TextSource.parse(spec)
        except DataError as error:
            raise ConfirmError(f"{config.source}: confirm.repair_calibration: {error}") from None
        name = source.files[0]
        tried = [Path(resolve(config, name)), Path(name)]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            raise ConfirmError(f"{config.source}: confirm.repair_calibration: {name!r} not found "
                               f"(tried {', '.join(map(str, tried))})")
        texts.append(source.model_copy(update={"files": (str(found.resolve()),)}))
    return texts


def confirm(study_dir: Path, config: StudyConfig, settings: ConfirmSettings, candidates: list[Candidate],
            sources: list, *, progress: bool = True, trust_remote_code: bool | None = None,
            calibration: list[TextSource] | None = None, threads: int | None = None) -> int:
    """Run every candidate (skipping finished work); write the outputs; exit code 1 if any candidate failed.
    ``trust_remote_code``: None takes the config's setting (callers from the command line decide it)."""
    from tqdm.auto import tqdm

    from search.commands.confirm_report import write_outputs
    from search.commands.variants import wanted

    ctx, identity = _context(config, settings, sources, trust_remote_code, calibration, threads)
    out = study_dir / OUT_DIR  # created by its first file: a refusal leaves none
    dense_result = dense_scores(ctx, out, settings.dense_fingerprint(identity), progress)
    fingerprint = settings.fingerprint(identity | ctx.repair_identity)
    records = [_candidate(cand, ctx, out / cand.name, fingerprint, progress)
               for cand in tqdm(candidates, desc="candidates", unit="mask", disable=not progress)]
    paths = write_outputs(str(study_dir), out, dense_result, records, settings, wanted(settings.repair))  # + cached
    failed = [r["name"] for r in records if r["status"] != "ok"]
    print(f"confirmed {len(records) - len(failed)} of {len(records)} candidates; {paths['md']}, {paths['csv']}, "
          f"{paths['png']}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _context(config: StudyConfig, settings: ConfirmSettings, sources: list, trust_remote_code: bool | None,
             calibration: list[TextSource] | None, threads: int | None):
    """(the shared Context, the identity of model and held-out text that every fingerprint includes)."""
    import torch

    from objectives.calibration import BatchSpec, token_batch
    from search.commands.heal import corpus_windows
    from search.commands.variants import Context
    from search.config import heldout_sets, text_source
    from search.studydir import text_identity
    from surgery.cli import load_checked

    if threads or config.model.threads:
        torch.set_num_threads(threads or config.model.threads)
    name, _ = model_source(config)
    trust = config.model.trust_remote_code if trust_remote_code is None else trust_remote_code
    dtype = config.model.dtype if settings.dtype == "study" else settings.dtype
    dense, tokenizer = load_checked(name, dtype=dtype, device=config.model.device, trust_remote_code=trust)
    data = torch.cat([corpus_windows(source, tokenizer, settings.heal.seq_len) for source in sources])
    specs = {h.column: text_source(config, h.section) for h in heldout_sets(config)} if settings.heldout else {}
    heldout = {column: token_batch(spec, tokenizer) for column, spec in specs.items()}
    identity = {"model": name, "dtype": dtype,
                "heldout": {column: text_identity(spec) for column, spec in specs.items()}}
    calibration = calibration or repair_texts(config, settings)
    repair = {"repair_texts": [text_identity(BatchSpec(source, settings.repair_sequences, settings.repair_seq_len))
                               for source in calibration]} if settings.repair != "none" else {}
    return Context(dense, tokenizer, settings, data, name, heldout, calibration, identity, repair), identity


def _candidate(cand: Candidate, ctx, out: Path, fingerprint: str, progress: bool) -> dict:
    """One candidate's record: reused when finished with the same settings, else run (failures recorded)."""
    done = _load_done(out / "result.json", fingerprint, [v for v in ctx.settings.chosen() if v != "dense"])
    if done:
        return done
    out.mkdir(parents=True, exist_ok=True)
    try:
        record = run_candidate(cand, ctx, out, fingerprint, progress)
    except Exception as error:  # noqa: BLE001 - one candidate's failure must not stop the others
        record = {"candidate": cand.__dict__, "name": cand.name, "fingerprint": fingerprint, "status": "failed",
                  "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        print(f"candidate {cand.name} ({cand.mask}) failed: {record['error']}")
    atomic_write_text(out / "result.json", json.dumps(record, indent=1))
    return record
