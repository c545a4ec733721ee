"""A fingerprint of what a study's numbers depend on, and the checks that refuse to mix studies.

The fingerprint covers the resolved model path and a digest of its config, tokenizer and weights (the file itself
for a ``.gguf`` model), dtype, device type, calibration and held-out text (digests of the selected characters, and
the slices), objective, reference, budget, seed and repair-aware scoring (``engine.repair``): a re-run with another of these is refused before anything is
written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from search.stored import StudyMeta
from search.studydir.ownership import CONFIG_COPY, StudyDirError

FINGERPRINT_VERSION = 3  # 3: keep bits stored as one categorical distribution
NOT_MODEL_CONTENT = (".md", ".txt", ".gitattributes", "depthsearch-export.json")  # documentation, not weights


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def model_files(path: Path) -> list[Path]:
    """The files a model's numbers come from: the file itself (``.gguf``), else the folder's top-level files
    except documentation (config, tokenizer, weights, remote code)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(NOT_MODEL_CONTENT) and not p.name.upper().startswith("LICENSE"))


def model_digest(path: Path) -> str:
    """sha256 over the names and contents of :func:`model_files` (reads every weight file once)."""
    digest = hashlib.sha256()
    try:
        for file in model_files(path):
            digest.update(f"{file.name}\0{file_digest(file)}\n".encode())
    except OSError as error:
        raise StudyDirError(f"model {path}: cannot read {error.filename or path} ({error.strerror})") from None
    return digest.hexdigest()


def model_identity(name: str, local: bool) -> dict:
    """Resolved path (or hub id and cached snapshot) and content digest of a model."""
    if local:
        path = Path(name).expanduser().resolve()
        return {"path": str(path), "sha256": model_digest(path)}
    snapshot = _hub_snapshot(name)
    return {"path": name, "sha256": model_digest(snapshot) if snapshot else None}


def _hub_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no hub client): the id alone identifies it
        return None


def text_identity(spec) -> dict:
    """Digest of the selected characters of a ``BatchSpec``'s text, with the slice and the sampling."""
    from objectives.calibration import load_text

    text = load_text(spec.source)
    return {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "start": spec.source.start,
            "end": spec.source.end, "num_sequences": spec.num_sequences, "seq_len": spec.seq_len, "seed": spec.seed}


def fingerprint(config, device_type: str) -> dict:
    """Everything a study's stored numbers depend on (a study resumed with another of these would mix them)."""
    from search.config import model_source, text_source

    extra = {name: text_identity(text_source(config, section)) for name, section in config.extra_calibration.items()}
    return {
        **({"extra_calibration": extra} if extra else {}),  # absent without it: older studies keep resuming
        "version": FINGERPRINT_VERSION,
        "model": model_identity(*model_source(config)),
        "dtype": config.model.dtype,
        "device": device_type,
        "calibration": text_identity(text_source(config, config.calibration)),
        "heldout": text_identity(text_source(config, config.heldout)),
        "objective": config.objective,
        "reference": {"topk": config.reference.topk},
        "budget": {"metric": config.budget.metric, "targets": list(config.budget.targets),
                   "constraints": dict(config.budget.constraints)},
        "seed": config.seed,
        **repair_identity(config),  # absent without repair-aware scoring: older studies keep resuming
    }


def repair_identity(config) -> dict:
    """``{"repair": ...}`` when masks are scored after their linear repair (``engine.repair``), else empty: the
    method and the fit/score split (the calibration batch's first ``fit_sequences`` fit, the rest are scored;
    ``cross_fitted`` tells these studies from ones that scored on their fit sequences, which are refused)."""
    engine = config.engine
    if engine.repair == "none":
        return {}
    return {"repair": {"method": engine.repair, "fit_sequences": engine.repair_sequences, "cross_fitted": True,
                       "ridge": engine.repair_ridge}}


def _flat(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _short(value) -> str:
    text = repr(value)
    return text[:15] + "...'" if isinstance(value, str) and len(value) == 64 else text


def fingerprint_problems(stored: dict | None, current: dict, where: str) -> list[str]:
    """One ``key: stored X, now Y`` line per difference (empty when ``stored`` is None or equal)."""
    if stored is None or stored == current:
        return []
    if stored.get("version") != current.get("version"):
        return [f"{where} holds a study made by another version of depthsearch (fingerprint version "
                f"{stored.get('version', 1)}); use a new output_dir"]
    old, new = _flat(stored), _flat(current)
    return [f"{key}: the study has {_short(old.get(key))}, now {_short(new.get(key))}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


# resuming --------------------------------------------------------------------------------------------------
def check_resume(record, current: dict, where: Path, source, url: str) -> None:
    """Refuse to resume a study (a ``search.record.StudyRecord``, or None) made with other settings (every
    difference named), before anything is written. A new output directory whose storage ``url`` already holds
    a study of that name is told to name its own study."""
    from search.storage import shown_url
    from search.config import ConfigError, format_problems

    stored = None if record is None else record.fingerprint()
    problems = fingerprint_problems(stored, current, str(where))
    if not problems:
        return
    if (Path(where) / CONFIG_COPY).is_file():
        head = f"{where} holds a study made with other settings; use another output_dir, or restore them:"
    else:
        head = (f"storage {shown_url(url)} already holds a study named {record.study.study_name!r}, made with other "
                "settings; set study_name to keep another study beside it, or restore them:")
    raise ConfigError(format_problems(source, [head, *problems]))


def study_model(study_dir: Path, config, meta: StudyMeta | None, *, trust_remote_code: bool) -> tuple[str, bool]:
    """(model, trust_remote_code) for export and confirm: the model the study ran on, unchanged since (its digest
    is checked), with remote code only when the user passes ``--trust-remote-code`` (a study directory's
    config.yaml is data, never permission to run code)."""
    from search.config import model_source

    name, local = model_source(config)
    stored = ((meta.fingerprint if meta is not None else None) or {}).get("model")
    if isinstance(stored, dict) and stored.get("sha256"):
        if local and str(Path(name).resolve()) != stored["path"]:
            raise StudyDirError(f"{study_dir}/{CONFIG_COPY} names model {name}, but the study ran on "
                                f"{stored['path']}")
        if local and not Path(stored["path"]).exists():
            raise StudyDirError(f"{study_dir}: the study's model {stored['path']} no longer exists")
        now = model_identity(name, local)["sha256"]
        if now is not None and now != stored["sha256"]:
            raise StudyDirError(f"{study_dir}: the model at {stored['path']} changed since the study ran "
                                f"(sha256 {stored['sha256'][:12]}..., now {now[:12]}...); its masks were scored "
                                "on the old weights")
    if config.model.trust_remote_code and not trust_remote_code:
        raise StudyDirError(f"{study_dir}/{CONFIG_COPY} sets model.trust_remote_code: true; a study directory does "
                            "not give permission to run a model's code: pass --trust-remote-code to allow it")
    return name, bool(config.model.trust_remote_code and trust_remote_code)
