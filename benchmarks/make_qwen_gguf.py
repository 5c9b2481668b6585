"""Make a Qwen2.5-0.5B-shaped GGUF quantized to Q4_0 by llama.cpp's own tools, for benchmarks/decode.py.

    .venv/bin/python benchmarks/make_qwen_gguf.py [--verify] [--threads 2]

Every step is cached under $QIANWEN_HOME/bench/, so a rerun skips what is done; with the final
file present it only prints its path (and runs the checks with --verify).
1. A random checkpoint of Qwen2.5-0.5B's shape (transformers' Qwen2ForCausalLM, seed 0, bf16
   safetensors) with Qwen's real vocabulary: qwen.tiktoken as a tokenizer.json, plus <|endoftext|>,
   <|im_start|> and <|im_end|> (151643-151645, as in Qwen2.5).
2. llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist (the version benchmarks/decode.py
   runs); only the `llama-quantize` target is built (Release, -j2).
3. Its convert_hf_to_gguf.py (which puts its own gguf-py first on sys.path) to f16, then
   `llama-quantize f16.gguf out.gguf Q4_0`, with llama.cpp's default per-tensor choices.
4. After a build (or with --verify): qianwen loads the file quantized and generates, and its logits
   on a short prompt agree with llama-cpp-python's (AMX repack off, as in decode.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qianwen.paths import home  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
NAME = "qwen2.5-0.5b-shape"
QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
PROMPT = "The history of tea in China spans thousands of years. 中国的茶文化历史悠久"
T0 = time.perf_counter()


def step(msg: str) -> None:
    print(f"[make_qwen_gguf {time.perf_counter() - T0:5.0f}s] {msg}", flush=True)


def run(cmd: list[str | Path], **kw: Any) -> None:
    step("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def make_checkpoint(out: Path) -> Path:
    """Random weights of Qwen2.5-0.5B's shape and Qwen's vocabulary, as a Hugging Face folder."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qianwen.artifacts import QWEN_TIKTOKEN, fetch
    from qianwen.tokenizer import TiktokenTokenizer

    step(f"building a random Qwen2.5-0.5B-shaped checkpoint in {out}")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        TiktokenTokenizer(fetch(QWEN_TIKTOKEN), special_tokens=QWEN_SPECIALS).save(tmp)
        (tmp / "qwen.tiktoken").unlink()  # tokenizer.json says the same; keep the folder unambiguous
        config = Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
            max_window_layers=21, initializer_range=0.02, bos_token_id=151643, eos_token_id=151643,
        )
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)  # bf16, as Qwen2.5 ships
        model.save_pretrained(tmp)
        n = sum(p.numel() for p in model.parameters())
        step(f"checkpoint: {n / 1e6:.1f}M parameters")
        del model
        shutil.rmtree(out, ignore_errors=True)  # a folder left by an interrupted run
        tmp.chmod(0o755)  # mkdtemp's 0700 otherwise
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_llama_cpp(bench: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, unpacked to bench/llama.cpp-<version>."""
    src = bench / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    archive = bench / f"{SDIST}.tar.gz"
    if not archive.is_file():
        step(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
        with tempfile.TemporaryDirectory(dir=bench, prefix=".dl-") as d:
            run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
                 "--no-binary", ":all:", "--disable-pip-version-check", "-d", d])
            os.replace(Path(d) / archive.name, archive)
    step(f"unpacking {archive.name}: vendor/llama.cpp -> {src}")
    prefix = f"{SDIST}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(dir=bench, prefix=f".{src.name}."))
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(src, ignore_errors=True)  # a partial unpack (no convert_hf_to_gguf.py)
        os.replace(tmp / prefix, src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return src


def build_quantize(src: Path, build: Path) -> Path:
    """Configure and build only `llama-quantize` (static, so the binary stands alone; the warning
    flags are off because gcc 12 prints ~50,000 lines of -Wmaybe-uninitialized on the AVX-512 code)."""
    exe = build / "bin" / "llama-quantize"
    if exe.is_file():
        return exe
    step(f"building llama-quantize in {build} (Release, -j2)")
    t0 = time.perf_counter()
    run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
         "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
         "-DGGML_ALL_WARNINGS=OFF", "-DLLAMA_ALL_WARNINGS=OFF"], stdout=subprocess.DEVNULL)
    run(["cmake", "--build", build, "--target", "llama-quantize", "-j2"])
    step(f"llama-quantize built in {time.perf_counter() - t0:.0f} s")
    return exe


def convert_f16(src: Path, checkpoint: Path, out: Path) -> Path:
    if out.is_file():
        return out
    step(f"converting {checkpoint.name} to f16 with llama.cpp's convert_hf_to_gguf.py")
    tmp = out.with_name(f".{out.name}.tmp")
    paths = [str(src / "gguf-py"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))  # the vendor's gguf-py, not the installed one
    try:
        run([sys.executable, src / "convert_hf_to_gguf.py", checkpoint, "--outtype", "f16", "--outfile", tmp],
            env=env)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def quantize_q4_0(exe: Path, f16: Path, out: Path) -> Path:
    step(f"quantizing {f16.name} to Q4_0 with llama-quantize")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        run([exe, f16, tmp, "Q4_0"])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (qianwen's reader: gguf's takes ~10 s here)."""
    from qianwen.gguf_reader import GGUFFile

    counts: dict[str, int] = {}
    for t in GGUFFile(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def _llama(path: Path, threads: int):  # noqa: ANN202 (a llama_cpp.Llama)
    import llama_cpp

    default = llama_cpp.llama_model_default_params

    def params():  # noqa: ANN202
        p = default()
        p.use_extra_bufts = False  # the AMX repack buffers crash on this CPU (see decode.py)
        return p

    llama_cpp.llama_model_default_params = params
    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, logits_all=True,
                           verbose=False)


def verify(path: Path, threads: int, n_new: int = 8) -> bool:
    """qianwen loads and runs the file; its logits agree with llama-cpp-python's. Prints what it finds."""
    import numpy as np
    import torch

    import qianwen

    step(f"tensor types: {json.dumps(tensor_types(path))}")
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = qianwen.load(str(path), dtype="bfloat16", quantized=True)
    step(f"qianwen loaded it quantized in {time.perf_counter() - t0:.1f} s")
    ids = m.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        ours = m.logits(ids).numpy()
        steps = list(m.stream_tokens(ids, m.params(max_tokens=n_new, temperature=0, ignore_eos=True)))
    our_tokens = [s.token_id for s in steps]
    step(f"qianwen greedy tokens: {our_tokens}")

    llm = _llama(path, threads)
    their_ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    step(f"prompt: {len(ids)} tokens; llama.cpp's tokenizer gives the same ids: {their_ids == ids}")
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
    their_tokens = []
    for _ in range(n_new):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        their_tokens.append(tok)
        llm.eval([tok])
    step(f"llama.cpp greedy tokens: {their_tokens}")

    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    corr = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(ours, theirs, strict=True)]
    diff = np.abs(ours - theirs)
    step(f"logits vs llama.cpp over {len(ids)} positions: top-1 agreement {top1:.0%}, "
         f"correlation min {min(corr):.4f}, max |diff| {diff.max():.3f}, mean |diff| {diff.mean():.4f} "
         f"(logit std {theirs.std():.3f})")
    same = sum(a == b for a, b in zip(our_tokens, their_tokens, strict=True))
    step(f"greedy tokens equal at {same}/{n_new} steps")
    ok = len(our_tokens) == n_new and min(corr) > 0.99 and top1 >= 0.5
    step("verification " + ("passed" if ok else "FAILED (correlation <= 0.99 or top-1 agreement < 50%)"))
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verify", action="store_true", help="run the checks even when the file is already there")
    ap.add_argument("--threads", type=int, default=2, help="threads for the checks (default 2)")
    args = ap.parse_args()

    bench = home() / "bench"
    final = bench / f"{NAME}.Q4_0.gguf"
    if final.is_file() and not args.verify:
        print(final)
        return 0
    bench.mkdir(parents=True, exist_ok=True)
    if not final.is_file():
        checkpoint = make_checkpoint(bench / f"{NAME}-hf")
        src = fetch_llama_cpp(bench)
        exe = build_quantize(src, bench / f"llama.cpp-{LLAMA_CPP_PYTHON}-build")
        f16 = convert_f16(src, checkpoint, bench / f"{NAME}.f16.gguf")
        quantize_q4_0(exe, f16, final)
        step(f"wrote {final} ({final.stat().st_size / 1e6:.1f} MB)")
    ok = verify(final, args.threads)
    print(final)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        print(f"make_qwen_gguf: command failed ({e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        sys.exit(1)
