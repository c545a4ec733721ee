"""The package as users install it: a wheel, installed into a fresh environment outside the checkout, runs a tiny
study on a bundled model, exports its result and confirms it with a local lm-eval task, offline."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _fresh_env(tmp_path: Path) -> Path:
    """A new venv that sees this environment's dependencies (a .pth file) but not this checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)], tmp, env)
    python = _fresh_env(tmp)
    (wheel,) = (tmp / "dist").glob("depthsearch-*.whl")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], tmp, env)
    work = tmp / "work"
    work.mkdir()
    return python, work, env


def test_wheel_runs_a_study_an_export_and_a_confirm_task(installed):
    python, work, env = installed
    located = _run([str(python), "-c", "import studies, search; print(studies.__file__); print(search.__file__)"], work, env)
    assert str(ROOT) not in located  # the installed copy, not the checkout
    shipped = Path(located.splitlines()[0]).parent
    config = yaml.safe_load((shipped / "stories260k.yaml").read_text())
    for part in ("calibration", "heldout"):
        config[part]["files"] = [str(shipped / f) for f in config[part]["files"]]
    config["model"]["name"] = str(shipped / config["model"]["name"])
    config.update(strategies=[{"name": "shortgpt"}], budget={**config["budget"], "targets": [0.3]}, output_dir="study")
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    cli = [str(python), "-m", "search.study"]
    _run([*cli, "run", "tiny.yaml", "--no-progress"], work, env)
    _run([*cli, "export", "study", "--max-removed", "0.5", "--out", "pruned"], work, env)
    assert (work / "pruned" / "model.safetensors").is_file()
    _run([*cli, "confirm", "study", "--top", "1", "--tasks", "arc_easy", "--limit", "2", "--steps", "1",
          "--no-progress"], work, env)
    table = (work / "study" / "confirm" / "confirm.md").read_text()
    assert "arc_easy" in table
