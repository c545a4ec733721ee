"""``extra_calibration``: calibration text from several parts (e.g. two domains), interleaved into one batch."""

from __future__ import annotations

import optuna
import pytest
import torch
import yaml

from objectives.calibration import interleave, token_batch
from search.commands.confirm import corpus_sources
from search.config import load_config, text_source
from search.evaluation.workers import build_scorer
from search.study import main as study_main
from surgery.load import load_tokenizer
from surgery.mask import KeepMask
from tests.search.test_study_cli import ASSETS, MODEL, TEXT, run_study, study_config, write_config

WIKI = ASSETS / "text" / "wikitext2_test.raw"
WIKI_PART = {"wiki": {"files": [str(WIKI)], "end": 0.5, "num_sequences": 2, "seq_len": 32, "seed": 0}}


def test_interleave_spreads_each_part_evenly():
    stories, wiki = torch.zeros(4, 3), torch.ones(2, 3)
    mixed = interleave([stories, wiki])
    assert mixed.shape == (6, 3)
    assert mixed[:, 0].tolist() == [0, 1, 0, 0, 1, 0]  # the first two rows (a staged selection's) hold both
    equal = interleave([torch.arange(3)[:, None], 10 + torch.arange(3)[:, None]])
    assert equal[:, 0].tolist() == [0, 10, 1, 11, 2, 12]


def test_study_scores_masks_on_both_parts(tmp_path):
    out = run_study(tmp_path, strategies=[{"name": "shortgpt"}], extra_calibration=WIKI_PART)
    config = load_config(out / "config.yaml")
    assert config.extra_calibration["wiki"].files == [str(WIKI)]  # the copy names the file absolutely
    tokenizer = load_tokenizer(str(MODEL))
    parts = [token_batch(text_source(config, section), tokenizer)
             for section in (config.calibration, config.extra_calibration["wiki"])]
    scorer = build_scorer(config, device="cpu")  # what workers score on
    assert torch.equal(scorer.input_ids, interleave(parts))
    study = optuna.load_study(study_name="depthsearch", storage=f"sqlite:///{out / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    assert trials
    for trial in trials:  # the run scored on the same mixed batch
        assert trial.values[0] == pytest.approx(scorer.score(KeepMask.parse(trial.user_attrs["mask"])), rel=1e-5)


def test_changed_extra_calibration_refuses_to_resume(tmp_path, capsys):
    out = run_study(tmp_path, strategies=[{"name": "shortgpt"}], extra_calibration=WIKI_PART)
    changed = {"wiki": {**WIKI_PART["wiki"], "seed": 3}}
    config = write_config(tmp_path / "other.yaml", study_config(out, strategies=[{"name": "shortgpt"}],
                                                                extra_calibration=changed))
    assert study_main(["run", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "extra_calibration.wiki.seed: the study has 0, now 3" in err
    dropped = write_config(tmp_path / "dropped.yaml", study_config(out, strategies=[{"name": "shortgpt"}]))
    assert study_main(["run", str(dropped), "--no-progress"]) == 2
    assert "extra_calibration.wiki.sha256" in capsys.readouterr().err


BAD_PARTS = {
    "other seq_len": ({"wiki": {**WIKI_PART["wiki"], "seq_len": 64}},
                      "extra_calibration.wiki.seq_len: every calibration part has calibration.seq_len (32)"),
    "bad name": ({"wi ki": WIKI_PART["wiki"]}, "extra_calibration.wi ki: names are letters"),
    "missing file": ({"wiki": {**WIKI_PART["wiki"], "files": ["nope.txt"]}},
                     "extra_calibration.wiki.files.0: text file not found"),
    "too short": ({"wiki": {**WIKI_PART["wiki"], "start": 0.0, "end": 0.00003}}, "extra_calibration.wiki: "),
    "not a mapping": ({"wiki": [1, 2]}, "extra_calibration.wiki"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARTS))
def test_bad_extra_calibration_exits_2_and_writes_nothing(tmp_path, capsys, case):
    part, expected = BAD_PARTS[case]
    out = tmp_path / "out"
    config = write_config(tmp_path / "bad.yaml", study_config(out, extra_calibration=part))
    assert study_main(["run", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert str(config) in err
    assert not out.exists()


def test_overlap_names_the_calibration_part(tmp_path, capsys):
    part = {"held": {"files": [str(ASSETS / "text" / "tinystories_valid.txt")], "start": 0.9, "num_sequences": 2,
                     "seq_len": 32}}
    config = write_config(tmp_path / "bad.yaml", study_config(tmp_path / "out", extra_calibration=part))
    assert study_main(["run", str(config), "--dry-run"]) == 2
    assert "overlaps extra_calibration.held text" in capsys.readouterr().err


def test_plan_lists_every_part(tmp_path, capsys):
    config = write_config(tmp_path / "ok.yaml", study_config(tmp_path / "out", extra_calibration=WIKI_PART))
    assert study_main(["run", str(config), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert f"extra_calibration.wiki: {WIKI}[0:0.5], 2 x 32 tokens, seed 0" in plan
    assert yaml.safe_load(config.read_text())["extra_calibration"] == WIKI_PART


def test_healing_reads_every_calibration_part(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", study_config(tmp_path / "out", extra_calibration=WIKI_PART)))
    sources = corpus_sources(config, None)
    assert [(s.files, s.start, s.end) for s in sources] == [((str(TEXT.resolve()),), 0.0, 0.8),
                                                           ((str(WIKI.resolve()),), 0.0, 0.5)]
