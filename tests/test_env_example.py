"""`.env.example` lists every environment variable the settings read, and the documentation
(README.md, docs/) explains each one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "config" / "settings.py", ROOT / "config" / "celery.py"]


def _read_by_code() -> set[str]:
    names = set()
    for source in SOURCES:
        text = source.read_text()
        names |= set(re.findall(r'env_\w+\(\s*"([A-Z][A-Z0-9_]*)"', text))
        names |= set(re.findall(r'os\.environ\.get\(\s*"([A-Z][A-Z0-9_]*)"', text))
    return names


def _documented() -> dict[str, int]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {
        line.split("=", 1)[0]: number
        for number, line in enumerate(lines)
        if re.match(r"[A-Z][A-Z0-9_]*=", line)
    }


def test_every_setting_variable_is_in_env_example():
    assert _read_by_code() - set(_documented()) == set()


def test_every_documented_variable_is_read_and_has_a_comment_above_it():
    lines = (ROOT / ".env.example").read_text().splitlines()
    documented = _documented()
    assert set(documented) - _read_by_code() == set()
    assert [
        name for name, number in documented.items() if not lines[number - 1].startswith("# ")
    ] == []


def test_every_documented_variable_is_explained_in_the_docs():
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    text = "\n".join(page.read_text() for page in docs)
    assert [name for name in _documented() if f"`{name}`" not in text] == []
