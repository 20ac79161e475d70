"""Tests for llama_cpp.py: llama.cpp itself needs a build, so a tree of scripts that keep its command lines' contract
stands in for it (benchmark.py cpu's table, which reads these, is tested in test_benchmark.py)."""

import pytest
import torch

import llama_cpp


def fake_llama_cpp(root, crash_prefill=False):
    """A llama.cpp tree as gguf_files and bench use it: convert_hf_to_gguf.py and llama-quantize write their
    output file (its content the type), llama-bench prints its JSON (tg 12.5, pp 99 tok/s) and logs its arguments;
    with crash_prefill, a prefill without --repack 0 dies by SIGSEGV, as the AMX kernel did by SIGILL."""
    bin = root / "build" / "bin"
    bin.mkdir(parents=True)
    (root / "convert_hf_to_gguf.py").write_text(
        "import sys; a = sys.argv; open(a[a.index('--outfile') + 1], 'w').write(a[a.index('--outtype') + 1])\n")
    scripts = {"llama-quantize": 'echo "$3" > "$2"; echo quantize >> "$(dirname "$0")/log"',
               "llama-bench": f'echo "$@" >> "$(dirname "$0")/log"\n'
                              f'case "$*" in *"-n 0"*) ;; *) echo \'[{{"avg_ts": 12.5}}]\'; exit 0;; esac\n'
                              f'case "$*" in *"--repack 0"*) ;; *) [ {int(crash_prefill)} = 1 ] && kill -SEGV $$;; '
                              f'esac\necho \'[{{"avg_ts": 99.0}}]\''}
    for name, body in scripts.items():
        (bin / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin / name).chmod(0o755)
    return bin / "log"


@pytest.mark.parametrize("crash_prefill", [False, True])
def test_llama_bench_reads_its_json_and_retries_a_crashed_prefill_with_plain_layouts(tmp_path, crash_prefill):
    log = fake_llama_cpp(tmp_path, crash_prefill)
    threads = torch.get_num_threads()
    assert llama_cpp.bench(tmp_path, tmp_path / "m.gguf", 32, 512) == (12.5, 99.0, crash_prefill)
    calls = log.read_text().splitlines()
    assert calls[0].endswith("-p 0 -n 32") and calls[1].endswith("-p 512 -n 0")
    assert all(c.startswith(f"-m {tmp_path / 'm.gguf'} -t {threads} -r 3 -o json") for c in calls)
    assert calls[2:] == ([calls[1] + " --repack 0"] if crash_prefill else [])


def test_gguf_files_converts_once_and_quantizes_to_q8_0_and_q4_0(tmp_path):
    log = fake_llama_cpp(tmp_path / "llama.cpp")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "tokenizer.json").write_text("{}")
    gguf = llama_cpp.gguf_files(tmp_path / "llama.cpp", checkpoint)
    assert {k: (p.name, p.read_text().strip()) for k, p in gguf.items()} == {
        "bf16": ("ckpt-BF16.gguf", "bf16"), "int8": ("ckpt-Q8_0.gguf", "Q8_0"),
        "int8-dynamic": ("ckpt-Q8_0.gguf", "Q8_0"), "int4": ("ckpt-Q4_0.gguf", "Q4_0")}
    assert llama_cpp.gguf_files(tmp_path / "llama.cpp", checkpoint) == gguf
    assert log.read_text().split() == ["quantize", "quantize"]  # written once, found the second time
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    assert llama_cpp.gguf_files(tmp_path / "llama.cpp", other, ["int8-dynamic"]) == {
        "int8-dynamic": other.parent / "other-Q8_0.gguf"}  # the BF16 it was quantized from is written, not returned
    assert (other.parent / "other-BF16.gguf").is_file() and log.read_text().split() == ["quantize"] * 3
    with pytest.raises(SystemExit, match="expected a llama.cpp source tree with build/bin/llama-bench"):
        llama_cpp.gguf_files(tmp_path, checkpoint)
