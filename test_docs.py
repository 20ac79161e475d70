"""Tests for the documentation: the README is a front page, each page under docs/ is short, and every relative link
in them and in the notebook's text leads to a file that exists."""

import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).parent
README_MAX_LINES, PAGE_MAX_LINES = 250, 300

FENCED = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)  # code blocks hold no links
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), images too
REFERENCE = re.compile(r"^\s*\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)  # [name]: target
IMG_SRC = re.compile(r"<img\b[^>]*?\bsrc\s*=\s*[\"']([^\"']*)[\"']", re.I)
EXTERNAL = re.compile(r"^(https?:|mailto:)", re.I)


def documents(root):
    """(path, markdown text) of README.md, each docs/*.md, and each markdown cell of tour.ipynb."""
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    out = [(p, p.read_text(encoding="utf-8")) for p in docs if p.is_file()]
    notebook = root / "tour.ipynb"
    if notebook.is_file():
        for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] == "markdown":
                source = cell["source"]
                out.append((notebook, source if isinstance(source, str) else "".join(source)))
    return out


def relative_links(text):
    """The targets of text's relative links and images, each without its #anchor. Code blocks and code spans are
    not links: a span becomes a placeholder, so [`olmoe.py`](olmoe.py) still reads as a link."""
    text = INLINE_CODE.sub("code", FENCED.sub("", text))
    targets = LINK.findall(text) + REFERENCE.findall(text) + IMG_SRC.findall(text)
    targets = [unquote(t.split("#", 1)[0]) for t in targets if not EXTERNAL.match(t)]
    return [t for t in targets if t]  # a bare #anchor points into the same file


def broken_links(root):
    """'file: target' for each relative link under root that resolves to nothing."""
    return [f"{path.relative_to(root)}: {target}" for path, text in documents(root)
            for target in relative_links(text) if not (path.parent / target).exists()]


def test_every_relative_link_resolves():
    broken = broken_links(ROOT)
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("[up](../README.md#test) ![figure](missing.png)\n")
    (tmp_path / "README.md").write_text("[page](docs/page.md) [web](https://example.org) `[not](a-link)`\n"
                                        "```\n[nor](this)\n```\n<img src=\"docs/gone.png\">\n")
    assert broken_links(tmp_path) == ["README.md: docs/gone.png", "docs/page.md: missing.png"]


def test_readme_is_a_front_page():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to a page under docs/"


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_each_docs_page_is_short(page):
    lines = len(page.read_text(encoding="utf-8").splitlines())
    assert lines <= PAGE_MAX_LINES, f"{page.name} has {lines} lines; split it"
