"""Examples in the documentation keep working as time passes: no curl command carries a fixed
date (one written as "tomorrow" was soon in the past, and the API refused it)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LITERAL_TIME = re.compile(r"\b20\d\d-\d\d-\d\d(?:T\d\d:\d\d)?")


def _command_lines():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]:
        lines = page.read_text(encoding="utf-8").splitlines()
        in_command = False
        for number, line in enumerate(lines, 1):
            in_command = line.lstrip().startswith("curl ") or (in_command and line.endswith("\\"))
            if in_command or line.lstrip().startswith("curl "):
                yield page.relative_to(ROOT), number, line


def test_no_curl_example_has_a_fixed_date():
    stale = [
        f"{page}:{number}: {line.strip()}"
        for page, number, line in _command_lines()
        if _LITERAL_TIME.search(line)
    ]
    assert stale == []


def test_the_check_sees_the_readmes_curl_examples():
    assert any("curl" in line for _, _, line in _command_lines())


# A booking's time given as a literal (`--start 2027-01-04…`, `ends_at="2026-12-24…"`) in an
# SDK or CLI example: once that day has passed, the copied example is refused. (`--since` and
# `--until` of an export are in the past on purpose.)
_BOOKING_TIME = re.compile(
    r"""(?:--start|--end|\bstarts?_at|\bends?_at|\bstart|\bend)[ =:]+["']?20\d\d-\d\d-\d\d"""
)


def _code_lines():
    for page in [ROOT / "README.md", ROOT / "client" / "README.md",
                 *sorted((ROOT / "docs").glob("**/*.md"))]:  # fmt: skip
        in_block = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
            elif in_block:
                yield page.relative_to(ROOT), number, line


def test_no_sdk_or_cli_example_books_a_fixed_date():
    stale = [
        f"{page}:{number}: {line.strip()}"
        for page, number, line in _code_lines()
        if _BOOKING_TIME.search(line)
    ]
    assert stale == []


def test_the_check_sees_the_sdk_and_cli_examples():
    lines = [line for _, _, line in _code_lines()]
    assert any("sy.quotes.create(" in line for line in lines)
    assert any(line.startswith("switchyard reserve") for line in lines)
