"""The README and docs/ link to each other correctly: every relative link names a file that
exists and, when it has one, an anchor that is a heading of that page."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) outside code spans; targets with a scheme (https:, mailto:) are not checked.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text())
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_there_are_pages_and_links_to_check():
    assert (ROOT / "docs" / "operations.md") in PAGES
    assert len(_links(ROOT / "README.md")) >= 8


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert broken == []


def test_the_anchor_rule_matches_githubs():
    assert _anchor("`make run`") == "make-run"
    assert _anchor("Grid, curtailment and energy") == "grid-curtailment-and-energy"
    assert _anchor("Backups and restore") == "backups-and-restore"


def test_the_readme_stays_a_front_door():
    assert len((ROOT / "README.md").read_text()) <= 10_000


OPERATIONS = (ROOT / "docs" / "operations.md").read_text()


def _deploy_processes() -> list[str]:
    """The process lines of operations.md's deploy block, continuation lines joined."""
    block = re.search(r"run three kinds of processes.*?```sh\n(.*?)```", OPERATIONS, re.S)
    assert block, "operations.md lost its block of processes to run"
    return [line for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def test_each_documented_metrics_server_has_its_own_directory_and_port():
    # A shared PROMETHEUS_MULTIPROC_DIR is emptied by each server starting on it; a shared
    # CELERY_METRICS_ADDRESS leaves every worker but the first without its metrics server.
    servers = [line for line in _deploy_processes() if "gunicorn" in line or " worker " in line]
    directories = [re.search(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", line) for line in servers]
    workers = [line for line in servers if " worker " in line]
    addresses = [re.search(r"CELERY_METRICS_ADDRESS=(\S+)", line) for line in workers]

    assert len(servers) == 3 and all(directories) and all(addresses)
    assert len({match.group(1) for match in directories}) == len(servers)
    assert len({match.group(1) for match in addresses}) == len(workers)


@pytest.mark.django_db
def test_the_restore_check_counts_the_triggers_the_migrations_create():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
        (triggers,) = cursor.fetchone()
    stated = re.findall(
        r"the (\d+) triggers|tgisinternal\"\s+# (\d+), as on the source", OPERATIONS
    )

    assert len(stated) == 2
    assert {int(a or b) for a, b in stated} == {triggers}
