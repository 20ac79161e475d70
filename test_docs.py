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


# --------------------------------------------------------------------------------------------------------------
# The README's first run, offline, walked end to end on a tiny model


def test_the_readme_lists_every_file_with_its_current_length():
    """The README's file table names every .py file here and the notebook, each with its length: `wc -l` lines,
    or the notebook's cells."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| \[`([^`]+)`\]\(\1\) \| (\d+)(?: cells)? \|", readme, re.M))
    assert sorted(rows) == sorted([p.name for p in ROOT.glob("*.py")] + ["tour.ipynb"])
    for name, length in rows.items():
        text = (ROOT / name).read_text(encoding="utf-8")
        actual = len(json.loads(text)["cells"]) if name.endswith(".ipynb") else text.count("\n")
        assert int(length) == actual, f"README.md says {name} has {length}, it has {actual}"


def test_the_readme_runs_the_commands_the_offline_error_gives():
    """generate.py's offline error offers these commands; they must be the README's own first run."""
    import checkpoints

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in checkpoints.OFFLINE.replace("\\\n", "").splitlines():
        assert " ".join(command.split()) in " ".join(readme.replace("\\\n", "").split()), command


def test_the_offline_path_end_to_end(tmp_path, monkeypatch, capsys):
    """corpus -> train -> generate from the run's directory (bf16, int8, int4) -> routing -> evaluate --text ->
    the notebook, on a model of olmoe-cpu's proportions made small: experts 32 wide, so int4 picks group size 32."""
    from conftest import importorskip

    importorskip("matplotlib")
    nbclient, nbformat = importorskip("nbclient"), importorskip("nbformat")
    import corpus
    import evaluate
    import generate
    import routing
    import train

    monkeypatch.chdir(tmp_path)  # the README's commands run where runs/ is
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("OLMOE_CHECKPOINT", raising=False)
    corpus.main(["data", "--code-bytes", "100000"])
    (tmp_path / "small.json").write_text(json.dumps(dict(
        model_type="olmoe", hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=256)))
    capsys.readouterr()
    texts = [f"--text={name}=data/{file}" for name, file in [("code", "code/*.py"), ("prose", "prose.txt"),
                                                              ("science", "science.txt")]]
    train.main([*texts, "--out", "runs/olmoe-cpu", "--model", "small.json", "--vocab-size", "512", "--steps", "4",
                "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--save-every", "2",
                "--eval-tokens", "256"])
    err = capsys.readouterr().err
    # it talks from the first second, and shows no time left before ETA_AFTER steps have timed a step
    for said in (r"read \d+ files, [\d.]+ MB, in 3 domains \(code, prose, science\)",
                 r"training a byte-level BPE tokenizer of 512 tokens on [\d.]+ MB \.\.\. [\d.]+ s",
                 r"tokenizing [\d.]+ MB into runs/olmoe-cpu/tokens.bin \.\.\. [\d,]+ training tokens, [\d.]+ s",
                 "evaluating the untrained model on 256 held-out tokens of each domain", r"tok_s=\d+"):
        assert re.search(said, err), said
    assert not re.search(r"\d<\d", err)  # tqdm's "elapsed<remaining"
    run = tmp_path / "runs" / "olmoe-cpu"
    assert [p.parent.name for p in run.glob("step-*/train_state.pt")] == ["step-000004"]  # --keep-resumable 1

    for flags, note in [(["--dtype", "bfloat16"], None), (["--quantize", "int8"], None),
                        (["--quantize", "int4"], "note: int4 group size 32")]:
        generate.main(["--checkpoint", "runs/olmoe-cpu", "--prompt", "The capital of France is",
                       "--max-new-tokens", "8", *flags])
        out, err = capsys.readouterr()
        assert out.startswith("The capital of France is") and len(out) > len("The capital of France is\n"), flags
        assert err.startswith("runs/olmoe-cpu: a train.py run; its latest checkpoint is step-000004\n"), err
        assert note is None or note in err

    routing.main(["--checkpoint", "runs/olmoe-cpu", "--baseline", "runs/olmoe-cpu/step-000000", "--chunk-len", "32",
                  *[f"--text={d}=runs/olmoe-cpu/heldout/{d}.txt" for d in ("code", "prose", "science")],
                  "--max-tokens", "300", "--out", "lab"])
    assert {"report.md", "routing.json", "specialization.png", "coactivation.png"} <= {p.name for p in
                                                                                       (tmp_path / "lab").iterdir()}
    capsys.readouterr()
    evaluate.main(["--checkpoint", "runs/olmoe-cpu", "--text", "prose=runs/olmoe-cpu/heldout/prose.txt"])
    out, err = capsys.readouterr()
    assert "note: --text windows of 32 tokens, the sequence length step-000004 was trained on" in err
    assert re.match(r"prose: [\d.]+ bits per byte", out)
    evaluate.main(["--checkpoint", "runs/olmoe-cpu", "--text", "prose=runs/olmoe-cpu/heldout/prose.txt",
                   "--context", "64"])
    assert "warning: --context 64 is longer than the 32-token sequences step-000004 was trained on" in \
        capsys.readouterr().err

    # the notebook, in a real kernel, picks the run by itself and says so first
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(ROOT / "tour.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    first = next(c for c in notebook.cells if c.cell_type == "code").outputs[0]["text"]
    assert first == "this notebook runs on runs/olmoe-cpu: runs/olmoe-cpu/step-000004\n"
