"""The README and docs/ point only at files and headings that exist, name the extras their features
need, and list every `cloop` command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.name} links to missing files: {broken}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_heading_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")) or "#" not in target:
            continue
        path, fragment = target.split("#", 1)
        linked = page if not path else (page.parent / path)
        if linked.suffix == ".md" and linked.exists() and fragment not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{page.name} links to missing headings: {broken}"


def test_readme_names_the_extra_of_each_optional_feature() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for extra in ("analysis", "postgres", "psychopy", "acquisition"):
        assert f"pip install -e '.[{extra}]'" in readme
        assert re.search(rf"^{extra} = \[", pyproject, re.M), f"pyproject.toml has no '{extra}' extra"


def test_readme_command_table_lists_every_cloop_command() -> None:
    import typer.main

    from orchestrator.cli import app

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    missing = [name for name in commands if not re.search(rf"`cloop (?:[^`]*[\s|/])?{name}\b", table)]
    assert not missing, f"README's command table does not list: {missing}"
