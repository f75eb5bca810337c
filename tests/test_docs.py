"""The documentation points only at what the repository holds (issue #19).

- Every relative link in README.md, docs/*.md and bench/README.md names a file that exists,
  and an anchor it gives names a heading of that file (GitHub's heading ids).
- docs/internals.md's layout is checked against src/poise: every module and package is named
  in it, and every file it names exists.
- Nothing cites documents kept outside the repository (the project carries its own copies:
  docs/http-rules.md, docs/benchmarking.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "poise"
PAGES = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


def test_pages_exist() -> None:
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    expected = {"configuration.md", "http.md", "http-rules.md", "balancing.md", "health.md"}
    expected |= {"l4.md", "tls.md", "registry.md", "operations.md", "sdk.md", "internals.md"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif not dest.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, broken


def test_link_checker_sees_breakage(tmp_path: Path) -> None:
    """The checks above can fail: a missing file and a missing heading are both caught."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[a](missing.md) [b](#nowhere) [c](#title) [d](https://x.y)\n")
    found = [t for t in links(page) if not t.startswith("https:")]
    assert found == ["missing.md", "#nowhere", "#title"]
    assert anchors(page) == {"title"}
    assert slug("L4 (TCP): `bench/l4.py`") == "l4-tcp-benchl4py"
    assert slug("`poise status`") == "poise-status"


def layout() -> list[str]:
    text = (ROOT / "docs" / "internals.md").read_text(encoding="utf-8")
    section = text.split("## Layout", 1)[1]
    block = re.search(r"^```\n(.*?)^```", section, re.M | re.S)
    assert block is not None, "docs/internals.md: no layout block under ## Layout"
    return block.group(1).splitlines()


def layout_entries() -> dict[str, list[str]]:
    """Each entry of the layout (`config/`, `routing.py`, `tests/`...) -> the file names in
    its description. Entries under src/poise/ are indented two spaces; tests/ and bench/ are
    at the margin."""
    entries: dict[str, list[str]] = {}
    current = ""
    for line in layout():
        m = re.match(r"^(  )?(\S+)(.*)$", line)
        if m and not line.startswith("   "):
            current = ("src/poise/" if m.group(1) else "") + m.group(2)
            entries[current] = []
            rest = m.group(3)
        else:
            rest = line
        entries[current] += re.findall(r"(?<![\w*/.])(\w+(?:\.py|\.html|\.c|/))(?![\w*])", rest)
    return entries


def test_layout_names_exist() -> None:
    missing = []
    for entry, names in layout_entries().items():
        if entry == "src/poise/":
            continue
        base = ROOT / entry
        if not base.exists():
            missing.append(entry)
            continue
        # a top-level module's description names modules beside it; a directory's, its files
        where = base if base.is_dir() else base.parent
        missing += [f"{entry}: {name}" for name in names if not (where / name).exists()]
    assert not missing, missing


def test_layout_lists_every_module() -> None:
    entries = layout_entries()
    named = set(entries)
    for entry, names in entries.items():
        if entry.endswith("/") and entry.startswith("src/poise/"):
            named |= {entry + name for name in names}
    unnamed = []
    for path in sorted(SRC.rglob("*")):
        if "__pycache__" in path.parts or path.name in ("__init__.py", "__main__.py"):
            continue
        if path.is_dir():
            rel = f"src/poise/{path.relative_to(SRC)}/"
        elif path.suffix in (".py", ".html", ".c"):
            rel = f"src/poise/{path.relative_to(SRC)}"
        else:
            continue
        if rel not in named:
            unnamed.append(rel)
    assert not unnamed, f"not in docs/internals.md's layout: {unnamed}"


def test_layout_parser_reads_entries() -> None:
    entries = layout_entries()
    assert "src/poise/config/" in entries and "src/poise/routing.py" in entries
    assert "tls.py" in entries["src/poise/config/"]
    assert "run.py" in entries["bench/"]


# Built from parts so that this file does not name them itself.
FOREIGN = ("../" + "shared", "HTTP-RULES" + ".md", "BENCH" + ".md")


def test_no_reference_outside_the_repository() -> None:
    files = [ROOT / "README.md"]
    for top in ("src", "tests", "bench", "docs"):
        files += [p for p in (ROOT / top).rglob("*") if p.is_file()]
    hits = []
    for path in files:
        if "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{path.relative_to(ROOT)}: {name}" for name in FOREIGN if name in text]
    assert not hits, hits
