"""The README's commands run: every fenced block's commands, in order, in a subprocess, as written or in their small form.

The convention:
- A command is a line of a fenced README block that starts with ``python``, ``make`` or ``time`` (a trailing ``\\``
  continues it); ``#`` lines are shown output. A new command line is picked up without editing this file.
- It runs as written unless SMALL maps it (its exact text) to a small form: the same command with small settings
  (``--dry-run``, ``--limit 2``, ...). A ``python benchmarks/...`` line not in SMALL runs with ``--smoke`` added.
  A SMALL entry whose command left the README fails ``test_small_forms_name_readme_commands``.
- A command that needs what the repository does not ship ends with ``# needs: <what>`` in the README (a GPU, a hub
  model); its block is skipped with that reason. SKIP names the commands a test cannot run, with the reason.
- Each block runs in its own folder, which links the repository's packages, ``studies``, ``benchmarks``, the
  Makefile and ``runs/``; ``runs/`` is shared by the session, and a ``runs/<name>`` that a command reads is made
  first, once, as a tiny study of ``studies/<name>.yaml`` (TINY: two one-pass strategies, 2 x 32 tokens). ``/tmp/``
  in a command is the block's own folder.
- A block that reads the SmolLM2 GGUF skips until ``make smollm2`` has fetched it (and fails under ``CI``).
Static checks (every file a command reads exists or is fetched by a documented command) are fast; running the
blocks is slow.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.project.test_benchmark_scripts import script_env

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PROGRAMS = ("python", "make", "time")
LINKED = ("search", "surgery", "objectives", "studies", "benchmarks", "Makefile", "pyproject.toml")
GGUF = ROOT / "studies/assets/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
FETCHED = {"studies/assets/models/smollm2-135m-instruct": "make smollm2"}  # path prefix -> the command placing it
TINY = [{"name": "shortgpt"}, {"name": "gromov"}]  # the strategies of a tiny study: one forward pass each
MAKE = "make -o {venv}/.installed VENV={venv}"  # the Makefile with this interpreter's environment, not a new one

SKIP = {"make test": "the default test run itself (this test is part of it)"}
SMALL = {
    "make study": f"{MAKE} study STUDY=tiny/stories260k.yaml OUT=runs/stories260k",
    "make smollm2": f"{MAKE} smollm2",
    "python -m search.study run studies/stories260k.yaml [--dry-run] [--output-dir DIR] [--storage URL] [--no-progress]":
        "python -m search.study run studies/stories260k.yaml --dry-run --output-dir runs/dry --no-progress",
    "python -m search.study run stories260k":
        "python -m search.study run stories260k --dry-run --output-dir runs/dry",
    "python -m search.study export runs/stories260k --max-removed 0.3 --out pruned/ [--objective validation|heldout_ppl|calibration] "
    "[--force]": "python -m search.study export runs/stories260k --max-removed 0.3 --out pruned/ --objective calibration "
                 "--force",
    "python -m search.study confirm runs/tinystories-l12-compare --budgets 0.27 --config "
    "studies/tinystories-l12-compare.yaml": "python -m search.study confirm runs/tinystories-l12-compare --budgets 0.27 "
                                            "--config studies/tinystories-l12-compare.yaml --limit 2 --steps 1",
    "python -m search.study confirm runs/stories260k --top 3 [--tasks tinystories_ppl arc_easy] [--limit 50] [--steps 100]":
        "python -m search.study confirm runs/stories260k --top 1 --tasks tinystories_ppl arc_easy --limit 2 --steps 1",
    "python -m search.study bench runs/stories260k/export-30pct --against studies/assets/models/stories260k "
    "[--batch-size 8 --seq-len 256 --repeats 9]":
        "python -m search.study export runs/stories260k --max-removed 0.3 --out runs/stories260k/export-30pct --force "
        "&& python -m search.study bench runs/stories260k/export-30pct --against studies/assets/models/stories260k "
        "--batch-size 1 --seq-len 16 --context 16 --repeats 1 --warmup 0",
    "python -m search.study confirm runs/smollm2-confirm --config studies/smollm2-135m.yaml --masks "
    "studies/results/smollm2-135m/recommended.csv [--limits lambada_openai=all] [--variants dense pruned] "
    "[--threads 1]": "python -m search.study confirm runs/smollm2-confirm --config studies/smollm2-135m.yaml --masks "
                     "studies/results/smollm2-135m/recommended.csv --tasks copa --limit 2 "
                     "--variants dense --threads 1",
    "python -m search.study confirm runs/smollm2-confirm --config studies/smollm2-135m.yaml --masks "
    "studies/results/smollm2-135m/recommended.csv":
        "python -m search.study confirm runs/smollm2-confirm-500 --config studies/smollm2-135m.yaml --masks "
        "studies/results/smollm2-135m/recommended.csv --tasks copa --limit 2 --variants dense --threads 1",
    "python -m search.study run studies/smollm2-135m.yaml --no-progress":
        "python -m search.study run studies/smollm2-135m.yaml --no-progress --dry-run --output-dir runs/dry",
    "python -m search.study run studies/smollm2-135m-sleb-evolutionary.yaml --no-progress":
        "python -m search.study run studies/smollm2-135m-sleb-evolutionary.yaml --no-progress --dry-run "
        "--output-dir runs/dry",
    "python benchmarks/independent_ppl.py --windows 16 --seq-len 256 --text "
    "wikitext2_valid=studies/assets/text/wikitext2_valid.tokens --text "
    "tinystories_train=studies/assets/text/tinystories_train_head.txt --model dense=<the .gguf> --model "
    "own-25=<export> ...":
        "python -m surgery.export --model studies/assets/models/stories260k --mask AM,AM,--,AM,AM --out own-25 && "
        "python benchmarks/independent_ppl.py --windows 2 --seq-len 32 --text "
        "wikitext2_valid=studies/assets/text/wikitext2_valid.tokens --text "
        "tinystories_train=studies/assets/text/tinystories_train_head.txt --model dense=studies/assets/models/stories260k "
        "--model own-25=own-25",
    "time python -m search.study run studies/stories260k.yaml --no-progress":
        "python -m search.study run studies/stories260k.yaml --no-progress --dry-run --output-dir runs/dry",
    "time python -m search.study run studies/tinystories-l12-compare.yaml --no-progress":
        "python -m search.study run studies/tinystories-l12-compare.yaml --no-progress --dry-run --output-dir runs/dry",
    "python -m search.study confirm runs/tinystories-l12-compare --budgets 0.27 --config "
    "studies/tinystories-l12-compare.yaml --no-progress":
        "python -m search.study confirm runs/tinystories-l12-compare --budgets 0.27 --config "
        "studies/tinystories-l12-compare.yaml --no-progress --limit 2 --steps 1",
    "python -m search.study confirm runs/smollm2-135m --config studies/smollm2-135m.yaml --budgets 0.25 --no-progress":
        "python -m search.study confirm runs/smollm2-135m --config studies/smollm2-135m.yaml --budgets 0.25 "
        "--no-progress --tasks copa --limit 2 --steps 1",
    "python -m search.study bench /tmp/lat/ex25 --against studies/assets/models/tinystories-l12 --threads 1 "
    "--batch-size 8 --seq-len 256 --repeats 9":
        "python -m search.study bench /tmp/lat/ex25 --against studies/assets/models/tinystories-l12 --threads 1 "
        "--batch-size 1 --seq-len 16 --context 16 --repeats 1 --warmup 0",
}


# reading the README -------------------------------------------------------------------------------------------
def blocks(text: str | None = None) -> list[list[str]]:
    """The fenced blocks that hold commands, each as its list of commands (continuations joined)."""
    found, lines, inside = [], [], False
    for line in (README.read_text(encoding="utf-8") if text is None else text).splitlines():
        if line.startswith("```"):
            if inside and (commands := block_commands(lines)):
                found.append(commands)
            lines, inside = [], not inside
        elif inside:
            lines.append(line)
    return found


def block_commands(lines: list[str]) -> list[str]:
    commands, current = [], []
    for line in lines:
        if current or line.split(" ", 1)[0] in PROGRAMS:
            current.append(line.strip().removesuffix("\\").strip())
            if not line.rstrip().endswith("\\"):
                commands.append(" ".join(current))
                current = []
    return commands


def split_comment(command: str) -> tuple[str, str]:
    """(the command with its spaces normalised, its trailing comment without the ``#``)."""
    quote = None
    for i, char in enumerate(command):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (i == 0 or command[i - 1].isspace()):
            return " ".join(command[:i].split()), command[i + 1:].strip()
    return " ".join(command.split()), ""


def needs(command: str) -> str | None:
    comment = split_comment(command)[1]
    return comment[len("needs:"):].strip() if comment.startswith("needs:") else None


def small_form(command: str) -> str:
    text = split_comment(command)[0]
    if text in SMALL:
        return SMALL[text]
    return text + " --smoke" if text.startswith("python benchmarks/") else text


def block_id(block: list[str]) -> str:
    return split_comment(block[0])[0][:60]


BLOCKS = blocks()


# static checks (fast) -----------------------------------------------------------------------------------------
def test_readme_commands_are_found():
    commands = [split_comment(c)[0] for block in BLOCKS for c in block]
    assert "make study" in commands and "python -m search.study report runs/stories260k" in commands
    assert any(c.startswith("python benchmarks/greedy_engine.py") for c in commands)


def test_small_forms_name_readme_commands():
    commands = {split_comment(c)[0] for block in BLOCKS for c in block}
    assert sorted((set(SMALL) | set(SKIP)) - commands) == []


def test_every_command_runs_as_written_or_has_a_small_form():
    placeholders = [c for block in BLOCKS for c in block if re.search(r"<[^>]+>|\[--|\.\.\.", small_form(c))
                    and not needs(c) and split_comment(c)[0] not in SKIP]
    assert placeholders == [], "add a small form to SMALL (or `# needs: ...` in the README)"


def test_every_file_a_command_reads_is_shipped_or_fetched():
    missing = []
    for block in BLOCKS:
        for command in block:
            for token in re.findall(r"(?:^|[\s=])((?:studies|benchmarks|objectives|surgery|search)/[^\s\"'\]]+)",
                                    split_comment(command)[0]):
                token = re.sub(r":[0-9.]+:[0-9.]+$", "", token)  # PATH:START:END names a slice of PATH
                if not (ROOT / token).exists() and not any(token.startswith(p) for p in FETCHED):
                    missing.append((command, token))
    assert missing == []


def test_fetched_files_are_placed_by_a_readme_command():
    commands = {split_comment(c)[0] for block in BLOCKS for c in block}
    assert set(FETCHED.values()) <= commands


def test_block_parsing():
    text = "x\n```\npython a.py --x 1 \\\n    --y 2   # needs: GPU\n# output\nmake t\n```\n```\ntree/\n```\n"
    assert [[split_comment(c)[0] for c in block] for block in blocks(text)] == [["python a.py --x 1 --y 2", "make t"]]
    assert needs(blocks(text)[0][0]) == "GPU" and split_comment('python m.py --mask "A #M"')[1] == ""


# running the blocks (slow) ------------------------------------------------------------------------------------
def link_tree(folder: Path, runs: Path) -> Path:
    """``folder`` with links to the repository's packages, studies, benchmarks and Makefile, and to ``runs``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name)
    (folder / "runs").symlink_to(runs)
    (folder / "tiny").symlink_to(runs.parent / "tiny")
    return folder


def tiny_config(name: str, runs: Path) -> Path:
    """``studies/<name>.yaml`` with TINY's strategies and 2 x 32 tokens of every text, written to tiny/<name>.yaml."""
    from search.commands.run.plan import portable_config
    from search.config import load_config

    config = portable_config(load_config(ROOT / "studies" / f"{name}.yaml"))
    config["strategies"] = TINY
    for section in [config["calibration"], config["heldout"], *config.get("extra_calibration", {}).values(),
                    *config.get("extra_heldout", {}).values(), *config.get("validation", {}).values()]:
        section.update(num_sequences=2, seq_len=32)
    config["output_dir"] = f"runs/{name}"
    path = runs.parent / "tiny" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_command(command: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    venv = str(Path(sys.executable).parent.parent)
    return subprocess.run(["bash", "-c", f"set -e; {command.replace('{venv}', venv)}"], cwd=cwd, env=script_env(),
                          text=True, capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """(the session's runs/ folder, a function making the tiny study runs/<name> once)."""
    base = tmp_path_factory.mktemp("readme")
    runs, made = base / "runs", {}
    runs.mkdir()
    (base / "tiny").mkdir()

    def study(name: str) -> None:
        if name not in made:
            config = tiny_config(name, runs)
            folder = base / "make" if (base / "make").exists() else link_tree(base / "make", runs)
            made[name] = run_command(f"python -m search.study run {config} --no-progress", folder)
            assert made[name].returncode == 0, made[name].stderr[-3000:]
        assert made[name].returncode == 0, f"the tiny study {name} failed"

    return runs, study


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_readme_block_runs(block, workspace, tmp_path):
    runs, study = workspace
    reasons = {c: needs(c) or SKIP.get(split_comment(c)[0]) for c in block}
    commands = [small_form(c) for c in block if not reasons[c]]
    if not commands:
        pytest.skip("; ".join(reasons.values()))
    if any("smollm2" in c for c in commands) and not GGUF.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{GGUF} is missing: CI runs `make smollm2` first")
        pytest.skip("needs the SmolLM2 GGUF: run `make smollm2` first")
    folder = link_tree(tmp_path / "block", runs)
    for command in commands:
        for name in re.findall(r"runs/([\w.-]+)", command):
            if (ROOT / "studies" / f"{name}.yaml").is_file():
                study(name)
        command = command.replace("/tmp/", f"{folder}/tmp/")
        done = run_command(command, folder)
        assert done.returncode == 0 and "Traceback" not in done.stderr, \
            f"{command}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        for out in re.findall(r"--out[ =](\S+)", command):
            assert any((folder / out).iterdir()), f"{command}: nothing written to {out}"


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_header_command_dry_runs(config, tmp_path):
    lines = config.read_text(encoding="utf-8").splitlines()
    header = lines[0]
    assert header.startswith("# python -m search.study run "), header
    marker = next((line for line in lines if line.startswith("# needs:")), None)  # in the leading comments
    if marker:
        pytest.skip(marker[len("# needs:"):].strip())
    done = run_command(f"{header[2:]} --dry-run --output-dir {tmp_path / 'dry'}", ROOT)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing
