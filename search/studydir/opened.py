"""A study directory opened once: its config copy and storage resolved, its record read back (or a clear error)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from search.config import StudyConfig, load_config
from search.record import StudyRecord, open_record
from search.storage import storage_problems, storage_url
from search.stored import StrategyRecord, StudyMeta
from search.studydir.ownership import CONFIG_COPY, StudyDirError


@dataclass
class Study:
    """One study on disk: its directory, the config copy, the storage URL and the study record."""

    directory: Path
    config: StudyConfig
    url: str
    record: StudyRecord

    def meta(self) -> StudyMeta:
        """The run metadata; a study that never stored it is a :class:`StudyDirError`."""
        meta = self.record.meta()
        if meta is None:
            raise StudyDirError(f"{self.directory}: the study has no run metadata yet (run `search.study run` first)")
        return meta

    def strategy_records(self) -> dict[str, StrategyRecord]:
        return self.record.strategy_records()


def open_study(study_dir: Path | str) -> Study:
    """The study of a directory ``run`` wrote: its config copy read and its storage opened once, every stored
    attribute checked (a damaged one is one message naming it)."""
    study_dir = Path(study_dir)
    copy = study_dir / CONFIG_COPY
    if not study_dir.is_dir():
        why = "it is not a directory" if study_dir.exists() else "it does not exist"
        raise StudyDirError(f"{study_dir} is not a study directory: no config.yaml ({why})")
    if not copy.is_file():
        raise StudyDirError(f"{study_dir} is not a study directory: no config.yaml (run `search.study run` first)")
    config = load_config(copy)
    url = storage_url(config.storage, study_dir)
    problems = storage_problems(url, study_dir, key=f"{copy}: storage", must_exist=True)
    if problems:
        raise StudyDirError("; ".join(problems))
    record = open_record(url, create=False, name=config.study_name)
    if record is None:
        raise StudyDirError(f"{study_dir}: no study {config.study_name!r} in {url} (run `search.study run` first)")
    record.check_stored()
    return Study(study_dir, config, url, record)
