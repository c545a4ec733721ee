"""Build the TinyStories benchmark files from the held-out stories (deterministic; rewrites the JSONL files).

    python objectives/tasks/build_tinystories.py

Source: the last 20% of ``studies/assets/text/tinystories_valid.txt`` (split at the last blank line before 80%
of its characters), which neither bundled model saw in training. Writes to ``studies/assets/benchmarks/``:

- ``tinystories_ppl.jsonl``   {text}: one paragraph per row, scored by rolling log-likelihood (word perplexity);
- ``tinystories_cloze.jsonl`` {context, continuation}: the previous paragraph and the current one up to the last
  word of one of its sentences, kept when that word (not a stop word) already occurs in the context, as in
  LAMBADA, so that the broader context predicts it;
- ``tinystories_next.jsonl``  {query, choices, gold}: the start of a paragraph and its true next sentence among
  three sentences drawn from paragraphs at least ``FAR`` paragraphs away (other stories).
Rows are shuffled with a fixed seed so that a sample ``limit`` takes a spread of stories.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from studies import assets
from surgery.files import atomic_write_text

SOURCE = assets("text", "tinystories_valid.txt")
OUT = assets("benchmarks")
HELDOUT_START = 0.8
SEED = 20240601
FAR = 30  # distractor sentences come from paragraphs at least this far away
NUM_DISTRACTORS = 3
STOP_WORDS = set(
    "the and her his him she they them you was for not that this with all too had are one day yes very then what "
    "there their time".split()
)

_SENTENCE_END = re.compile(r'(?<=[.!?])["”]?\s+(?=["“A-Z])')
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})(?P<tail>[.!?,\"'”]*)$", re.S)


def heldout_paragraphs(path: Path = SOURCE) -> list[str]:
    """Paragraphs of the held-out slice, whitespace-normalised, in file order."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    cut = text.rfind("\n\n", 0, int(len(text) * HELDOUT_START))
    return [" ".join(p.split()) for p in text[cut:].split("\n\n") if p.strip()]


def sentences(paragraph: str) -> list[str]:
    """Split on sentence ends (keeping closing quotes with their sentence)."""
    parts, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        parts.append(paragraph[start : match.start() + len(match.group(0).rstrip())].strip())
        start = match.end()
    parts.append(paragraph[start:].strip())
    return [p for p in parts if p]


def ppl_rows(paragraphs: list[str]) -> list[dict]:
    return [{"text": p} for p in paragraphs if len(p.split()) >= 8]


def cloze_rows(paragraphs: list[str]) -> list[dict]:
    """Context up to a sentence's last word; continuation = that word (no punctuation), seen in the context."""
    rows = []
    for index, paragraph in enumerate(paragraphs):
        before = paragraphs[index - 1] + " " if index else ""
        parts = sentences(paragraph)
        for end in range(1, len(parts) + 1):
            match = _LAST_WORD.match(" ".join(parts[:end]))
            if not match or match.group("word").lower() in STOP_WORDS:
                continue
            context, word = before + match.group("context"), match.group("word")
            if len(context.split()) >= 15 and re.search(rf"\b{re.escape(word)}\b", context, re.I):
                rows.append({"context": context, "continuation": word})
    return rows


def next_rows(paragraphs: list[str], rng: random.Random) -> list[dict]:
    """The first k sentences of a paragraph, its sentence k+1 and distractors from far-away paragraphs."""
    split = [sentences(p) for p in paragraphs]
    rows = []
    for index, parts in enumerate(split):
        if len(parts) < 3:
            continue
        k = rng.randrange(2, len(parts))
        pool = [j for j in range(len(split)) if abs(j - index) >= FAR and len(split[j]) >= 2]
        distractors = [rng.choice(split[j][1:]) for j in rng.sample(pool, NUM_DISTRACTORS)]
        choices = [parts[k], *distractors]
        rng.shuffle(choices)
        rows.append({"query": " ".join(parts[:k]), "choices": choices, "gold": choices.index(parts[k])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build(out: Path = OUT) -> dict[str, int]:
    """Write the three files; returns rows per file."""
    paragraphs = heldout_paragraphs()
    rng = random.Random(SEED)
    files = {
        "tinystories_ppl": ppl_rows(paragraphs),
        "tinystories_cloze": cloze_rows(paragraphs),
        "tinystories_next": next_rows(paragraphs, rng),
    }
    counts = {}
    for name, rows in files.items():
        rng.shuffle(rows)
        write_jsonl(out / f"{name}.jsonl", rows)
        counts[name] = len(rows)
    return counts


if __name__ == "__main__":
    for name, count in build().items():
        print(f"{name}.jsonl: {count} rows")
