"""A damaged study: stored attributes of the wrong shape (run metadata, strategy records, held-out caches, trial
attributes) or not decodable at all end `report`, `export`, `confirm` and a resuming `run` with one message naming
the study and the attribute, exit 2 and nothing written."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from search.study import main as study_main
from tests.faults import refused
from tests.search.test_faults_study import make_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    return make_study(root)[0]


def _edit(table: str, key: str, change):
    """Damage: the first row of ``table`` (study or trial user attrs) under ``key`` gets ``change(value)``."""
    def damage(db):
        with sqlite3.connect(db) as conn:
            row_id, text = conn.execute(f"select rowid, value_json from {table} where key = ? order by rowid",
                                        (key,)).fetchone()
            new = change(json.loads(text))
            conn.execute(f"update {table} set value_json = ? where rowid = ?",
                         (new if isinstance(new, str) and new.startswith("{") else json.dumps(new), row_id))
    return damage


STUDY, TRIAL = "study_user_attributes", "trial_user_attributes"
DAMAGES = {  # case: (damage, the attribute the message names, more expected text)
    "meta is a string": (_edit(STUDY, "meta", lambda m: "just a string"), "'meta'", "expected a mapping, got str"),
    "meta lacks num_layers": (_edit(STUDY, "meta", lambda m: {k: v for k, v in m.items() if k != "num_layers"}),
                              "'meta'", "num_layers: Field required"),
    "meta num_layers is text": (_edit(STUDY, "meta", lambda m: {**m, "num_layers": "five"}), "'meta'",
                                "num_layers: Input should be a valid integer"),
    "meta dense is a list": (_edit(STUDY, "meta", lambda m: {**m, "dense": [1, 2]}), "'meta'", "dense"),
    "meta is not JSON": (_edit(STUDY, "meta", lambda m: "{not json"), "cannot be read", "JSONDecodeError"),
    "strategy record is a list": (_edit(STUDY, "strategy:shortgpt", lambda r: [1, 2]), "'strategy:shortgpt'",
                                  "expected a mapping, got list"),
    "strategy result mask garbage": (_edit(STUDY, "strategy:shortgpt", lambda r: {**r, "results": {"0.2": "XY"}}),
                                     "'strategy:shortgpt'", "mask 'XY' does not parse"),
    "held-out perplexity is text": (_edit(STUDY, "heldout", lambda c: {**c, "ppl": {k: "low" for k in c["ppl"]}}),
                                    "'heldout'", "Input should be a valid"),
    "held-out mask too short": (_edit(STUDY, "heldout", lambda c: {**c, "ppl": {"AM,AM": 3.0}}), "'heldout'",
                                "has 4 sublayers, the study's model 10"),
    "trial mask is a number": (_edit(TRIAL, "mask", lambda m: 5), "'trial 0'", "mask: Input should be a valid string"),
    "trial mask too long": (_edit(TRIAL, "mask", lambda m: m + ",AM"), "'trial 0'", "has 12 sublayers"),
    "trial count is text": (_edit(TRIAL, "removed_attn", lambda m: "two"), "'trial 0'", "removed_attn"),
}
COMMANDS = {"report": [], "export": ["--max-removed", "4", "--out", "{tmp}/e"], "confirm": []}


def _damaged_copy(study, tmp_path, case):
    copy = tmp_path / "copy"
    shutil.copytree(study, copy)
    DAMAGES[case][0](copy / "study.db")
    return copy


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_damaged_study_refused_naming_the_study_and_the_attribute(study, tmp_path, capsys, case, command):
    copy = _damaged_copy(study, tmp_path, case)
    _, attr, expected = DAMAGES[case]
    extra = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    refused(capsys, study_main, [command, str(copy), *extra], ["study 'depthsearch'", attr, expected], tmp_path)


@pytest.mark.parametrize("case", ["meta is a string", "trial mask too long"])
def test_resuming_a_damaged_study_refused(study, tmp_path, capsys, case):
    copy = _damaged_copy(study, tmp_path, case)
    _, attr, expected = DAMAGES[case]
    refused(capsys, study_main, ["run", str(copy / "config.yaml"), "--output-dir", str(copy), "--no-progress"],
            ["study 'depthsearch'", attr, expected], tmp_path)
