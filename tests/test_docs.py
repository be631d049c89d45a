"""Every ``docs/...`` file the repository cites exists, with the sections cited; model cards cite
only what exists and the committed ones are what the card generator writes."""

from __future__ import annotations

import re
from pathlib import Path

from celo_hf import CeloNet

REPO = Path(__file__).resolve().parents[1]
#: ``docs/<name>.md`` not inside a longer path or URL (``huggingface.co/docs/...`` is not ours).
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*\w")
#: ``§4``, ``§6.3-6.4``: section numbers cited after a docs path on the same line.
SECTION = re.compile(r"§(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?")


def _repository_files() -> list[Path]:
    skipped = {"__pycache__", "build", "dist"}
    return [
        path for suffix in ("py", "sh", "md") for path in REPO.rglob(f"*.{suffix}")
        if not any(part.startswith(".") or part in skipped or part.endswith(".egg-info")
                   for part in path.relative_to(REPO).parts)
    ]


def _citations() -> list[tuple[str, str, list[str]]]:
    """``(where, docs path, sections cited)`` for every citation of a docs path."""
    found = []
    for path in _repository_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in DOCS_PATH.finditer(line):
                sections = [s for pair in SECTION.findall(line[match.end():]) for s in pair if s]
                found.append((f"{path.relative_to(REPO)}:{number}", match.group(), sections))
    return found


def _section_numbers(doc: Path) -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", doc.read_text(), flags=re.MULTILINE))


def test_every_cited_docs_file_and_section_exists():
    citations = _citations()
    assert {path for _, path, _ in citations} >= {"docs/celo-algorithm.md", "docs/meta-training.md"}
    missing = [(where, path) for where, path, _ in citations if not (REPO / path).is_file()]
    assert not missing, f"cited docs that are not in the repository: {missing}"
    bad_sections = [
        (where, path, section) for where, path, sections in citations for section in sections
        if section not in _section_numbers(REPO / path)
    ]
    assert not bad_sections, f"cited sections that the docs do not have: {bad_sections}"


def test_model_cards_cite_what_exists_and_committed_cards_are_current(tmp_path):
    CeloNet().save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "More Information Needed" not in card and "docs/celo-algorithm.md" in card
    cards = sorted((REPO / "meta_training" / "runs").glob("*/*/*/README.md"))
    assert cards, "no committed run cards found"
    for path in cards:
        expected = str(CeloNet.from_pretrained(str(path.parent)).generate_model_card())
        assert path.read_text() == expected, f"{path} is not what CeloNet's card template writes"


def test_ci_runs_the_readmes_test_command():
    """The README's two set-up commands: the second, installing and running the tests, is the one
    line ``.ci/run`` runs."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^```bash\n(.+)\n```$", readme.split("## Install and run", 1)[1].split("\n## ", 1)[0],
                          flags=re.MULTILINE)
    assert len(commands) == 2, commands
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[1] == ci_lines[-1] and "pytest" in commands[1]
