"""Tests of text.py: the --text arguments every command reads, the held-out split, the tokenizer trained here and
the token file."""

import numpy as np
import pytest

import text


@pytest.mark.parametrize("spec, message", [
    ("prose.txt", "expected NAME=FILE, e.g. code=olmoe.py"),
    ("=prose.txt", "expected NAME=FILE"),
    ("prose=", "expected NAME=FILE"),
])
def test_a_text_argument_without_a_name_or_a_file_says_what_is_expected(spec, message):
    with pytest.raises(ValueError, match=message):
        text.parse_spec(spec)
    assert text.parse_spec("code=a=b.txt") == ("code", "a=b.txt")  # the first '=' splits


def test_read_texts_reads_each_file_and_names_what_is_wrong(tmp_path):
    (tmp_path / "ok.txt").write_text("café\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert text.read_texts([f"a={tmp_path / 'ok.txt'}", f"b={tmp_path / 'ok.txt'}"]) == {"a": "café\n", "b": "café\n"}
    for specs, message in [([f"a={tmp_path / 'absent.txt'}"], "absent.txt: no such file"),
                           ([f"a={tmp_path}"], "no such file"),
                           ([f"a={tmp_path / 'empty.txt'}"], "empty.txt: empty"),
                           ([f"a={tmp_path / 'latin1.txt'}"], "latin1.txt: not UTF-8 text"),
                           ([f"a={tmp_path / 'ok.txt'}", f"a={tmp_path / 'ok.txt'}"], "the name 'a' is given twice")]:
        with pytest.raises(ValueError, match=message):
            text.read_texts(specs)


def test_read_domains_takes_globs_in_sorted_order_and_gathers_a_name_given_twice(tmp_path):
    for name in ("b.py", "a.py", "c.md"):
        (tmp_path / name).write_text(f"# {name}\n")
    (tmp_path / "blank.py").write_text("\n\n")
    domains = text.read_domains([f"code={tmp_path / '*.py'}", f"code={tmp_path / 'c.md'}"])
    assert domains == {"code": ["# a.py\n", "# b.py\n", "# c.md\n"]}  # the blank file dropped
    with pytest.raises(ValueError, match="no such file"):
        text.read_domains([f"x={tmp_path / '*.rs'}"])
    with pytest.raises(ValueError, match=r"empty \(no text in 1 file"):
        text.read_domains([f"x={tmp_path / 'blank.py'}"])


def test_split_domain_holds_out_whole_documents_from_the_end_and_cuts_one_at_a_line():
    docs = ["a" * 49 + "\n", "b\n" * 10, "c" * 30]
    train, held = text.split_domain(docs, 0.35)  # 35 of 100 characters: all of c, then whole lines of b reaching 5
    assert held == ["b\n" * 3, "c" * 30] and train == ["a" * 49 + "\n", "b\n" * 7]
    assert "".join(train + held) == "".join(docs)
    train, held = text.split_domain(["x\n" * 10], 0.2)  # a single file is cut too
    assert train == ["x\n" * 8] and held == ["x\n" * 2]


def test_train_tokenizer_puts_its_special_tokens_first_and_encodes_any_bytes():
    tokenizer = text.train_tokenizer(["the cat sat on the mat"] * 10, 280)
    assert tokenizer.token_to_id(text.EOS) == 0 and tokenizer.token_to_id(text.PAD) == 1
    ids = tokenizer.encode("日本語 🙂", add_special_tokens=False).ids
    assert tokenizer.decode(ids) == "日本語 🙂"
    only_eos = text.train_tokenizer(["the cat"] * 10, 270, special_tokens=[text.EOS])
    assert only_eos.token_to_id(text.EOS) == 0 and only_eos.token_to_id(text.PAD) is None


def test_token_file_holds_training_tokens_first_then_each_domains_held_out_tokens(tmp_path):
    tokenizer = text.train_tokenizer(["ab cd ef"] * 10, 270)
    splits = {"x": (["ab cd"], ["ef"]), "y": (["cd"], ["ab ab"])}
    index = text.build_token_file(tmp_path, tokenizer, 0, splits)
    tokens, again = text.open_token_file(tmp_path)
    assert again == index
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False).ids + [0]  # noqa: E731
    expected = encode("ab cd") + encode("cd") + encode("ef") + encode("ab ab")
    assert tokens.tolist() == expected and tokens.dtype == np.uint16
    assert index["train"] == [0, len(encode("ab cd") + encode("cd"))]
    assert index["val"]["y"] == dict(range=[len(expected) - len(encode("ab ab")), len(expected)], bytes=5)
    mtime = (tmp_path / "tokens.bin").stat().st_mtime_ns
    assert text.build_token_file(tmp_path, tokenizer, 0, splits) == index  # the same text: reused, not rewritten
    assert (tmp_path / "tokens.bin").stat().st_mtime_ns == mtime
