"""A study on disk, one owner for all of it: the directory and its lock (:mod:`.ownership`), the fingerprint of what
its numbers depend on (:mod:`.fingerprint`), the study opened once from its directory (:mod:`.opened`:
:func:`open_study`, with the typed :class:`StudyMeta` and :class:`StrategyRecord` of :mod:`search.stored`) and read
back into frames (:mod:`.reader`, imported on its own: it needs pandas)."""

from search.stored import StrategyRecord, StudyMeta
from search.studydir.fingerprint import (
    FINGERPRINT_VERSION, check_resume, fingerprint, fingerprint_problems, model_digest, model_files, model_identity,
    study_model, text_identity,
)
from search.studydir.opened import Study, open_study
from search.studydir.ownership import (
    CONFIG_COPY, LOCK_INFO, OWN_NAMES, StudyDirError, StudyLock, is_study_dir, make_dirs, output_dir_problem,
    remove_if_empty, remove_stale_temporaries, storage_change_problem,
)

__all__ = [
    "CONFIG_COPY", "FINGERPRINT_VERSION", "LOCK_INFO", "OWN_NAMES", "StrategyRecord", "Study", "StudyDirError",
    "StudyLock", "StudyMeta", "check_resume", "fingerprint", "fingerprint_problems", "is_study_dir",
    "make_dirs", "model_digest", "model_files", "model_identity", "open_study", "output_dir_problem",
    "remove_if_empty", "remove_stale_temporaries", "storage_change_problem", "study_model", "text_identity",
]
