"""``report``: write the Pareto report of a study directory into it (see :mod:`search.studydir.report`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from search.studydir import StudyDirError, StudyLock, open_study
from search.studydir.report import write_report


def main(args: argparse.Namespace) -> int:
    study = open_study(Path(args.study_dir))  # a study directory, or one clear error
    if not os.access(args.study_dir, os.W_OK | os.X_OK):
        raise StudyDirError(f"{args.study_dir}: the study directory is not writable; the report goes into it")
    with StudyLock(Path(args.study_dir), "python -m search.study report"):
        paths = write_report(study)
    print(f"report written: {', '.join(str(p) for p in paths.values())}")
    return 0
