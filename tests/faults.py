"""Helpers of the fault-injection suite (``tests/search/test_faults*.py``): file-tree snapshots, refusals, broken models.

``refused`` runs a command in process and asserts what every bad input must give: exit code 2, exactly one
``error:`` line naming what is wrong (no traceback), and a file tree identical to the one before (no file
created, changed or deleted; directory timestamps aside).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from tests.search.test_study_cli import ASSETS, MODEL, TEXT, study_config  # noqa: F401 - re-exported for the suites

PWNED = "PWNED"  # the file a model's own code would write if it ran


def tree(*roots: Path) -> dict[str, tuple]:
    """Every file and directory under ``roots``: (kind, size, mtime, sha1) of files, ``dir`` for directories."""
    found = {}
    for root in roots:
        if not root.exists():
            continue
        for path in [root, *sorted(root.rglob("*"))]:
            if path.is_symlink():
                found[str(path)] = ("link", str(path.readlink()))
            elif path.is_dir():
                found[str(path)] = ("dir",)
            else:
                data = path.read_bytes()
                found[str(path)] = ("file", len(data), path.stat().st_mtime_ns, hashlib.sha1(data).hexdigest())
    return found


def refused(capsys, command, argv: list[str], expected, *roots: Path) -> str:
    """Run ``command(argv)``: exit 2, one ``error:`` line holding every ``expected`` text, ``roots`` unchanged."""
    before = tree(*roots)
    code = command(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err
    for text in [expected] if isinstance(expected, str) else expected:
        assert text in err, err
    after = tree(*roots)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    return err


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def model_copy(tmp_path: Path, name: str = "model", edit=None) -> Path:
    """A copy of the bundled stories260k; ``edit(config_dict)`` changes its config.json."""
    target = tmp_path / name
    shutil.copytree(MODEL, target)
    if edit is not None:
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
        edit(config)
        (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return target


def remote_code_model(tmp_path: Path) -> Path:
    """A model folder whose config.json points ``auto_map`` at its own Python file, which would write PWNED."""
    target = model_copy(tmp_path, "remote", lambda c: c.update(
        model_type="evil_model", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}))
    (target / "evil.py").write_text(f"open({str(tmp_path / PWNED)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'evil_model'\n")
    return target
