"""How closely each quantized format qianwen keeps quantized follows the same weights in float, on a real
model (the default SmolLM2-135M-Instruct GGUF), on fixed bilingual prompts.

    .venv/bin/python benchmarks/quant_agreement.py [--threads 2]

Files (cached under $QIANWEN_HOME/bench/smollm2-formats/, each written atomically and reused):
1. `qianwen convert` of the default GGUF to a float32 Hugging Face folder (the source);
2. llama.cpp's convert_hf_to_gguf.py to f16, then llama-quantize to Q4_0, Q4_1, Q8_0, Q4_K_M and Q6_K
   (llama.cpp 0.3.36 as benchmarks/make_qwen_gguf.py fetches and builds it);
3. `qianwen.convert.quantize_folder` of the source at 8 and 4 bits.
Each is loaded quantized (bf16) and as its float reference (float32, blocks dequantized exactly; for the
quantized HF folders, the float32 source), and their `logits` on the prompts are compared: top-1 agreement
over all positions and mean KL(reference || quantized) per position. Two baselines (F16, and the source
itself) show what bf16 compute alone costs, since the quantized models run in bf16. A second pair of
columns compares with the source instead (for the GGUFs: what llama-quantize's rounding adds). The prompts stay under
`PREFILL_TOKENS`, so the quantized layers run their weight-only kernels (the decode path).

The source itself is Q4_1 dequantized (no float checkpoint is at hand), so a format whose grid holds
Q4_1's (Q4_1, int4 g32 with zeros) can reproduce it almost exactly: the "vs source" columns flatter those.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
from make_qwen_gguf import LLAMA_CPP_PYTHON, build_quantize, convert_f16, fetch_llama_cpp, tensor_types  # noqa: E402

import qianwen  # noqa: E402
from qianwen.api import Model  # noqa: E402
from qianwen.artifacts import DEFAULT_GGUF, fetch  # noqa: E402
from qianwen.paths import home  # noqa: E402
from qianwen.quant.linear import PREFILL_TOKENS, Int4Linear, Int8Linear  # noqa: E402

GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K_M", "Q6_K")
HF_BITS = (8, 4)
TEXTS = [
    "The history of tea in China spans thousands of years. Legend says the emperor Shennong discovered it "
    "when leaves from a wild tree fell into his pot of boiling water, and the drink slowly spread from "
    "medicine to daily life.",
    "中国是茶的故乡，饮茶的历史已有几千年。杭州的龙井茶以香郁、味甘而闻名。",
]
CHATS = [
    [{"role": "user", "content": "What will the weather be like in Hangzhou tomorrow? Should I bring an umbrella?"},
     {"role": "assistant", "content": "Tomorrow looks cloudy with light rain in the afternoon, so an umbrella "
                                      "is a good idea."}],
    [{"role": "user", "content": "明天北京天气怎么样？"}, {"role": "assistant", "content": "多云转小雨，要带伞。"}],
]
T0 = time.perf_counter()


def step(msg: str) -> None:
    print(f"[quant_agreement {time.perf_counter() - T0:5.0f}s] {msg}", flush=True)


def source_folder(gguf: Path, out: Path) -> Path:
    """The default GGUF as a float32 HF folder, by the CLI (which swaps the folder in atomically)."""
    if not (out / "config.json").is_file():
        step(f"qianwen convert {gguf.name} -> {out} (float32)")
        subprocess.run([sys.executable, "-m", "qianwen.cli.main", "convert", "-m", str(gguf), "--out", str(out),
                        "--dtype", "float32"], check=True, cwd=ROOT)
    return out


def llama_quantize(exe: Path, f16: Path, out: Path, kind: str) -> Path:
    if out.is_file():
        return out
    step(f"llama-quantize {f16.name} -> {out.name} ({kind})")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        subprocess.run([exe, f16, tmp, kind], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def hf_quantized(src: Path, out: Path, bits: int) -> Path:
    if not (out / "config.json").is_file():  # quantize_folder swaps the finished folder in
        from qianwen.convert import quantize_folder

        step(f"quantize_folder {src.name} -> {out.name} ({bits} bits)")
        quantize_folder(src, out, bits=bits)
    return out


def prompts(model: Model) -> list[list[int]]:
    """Token ids of the prompts (with the source model's tokenizer: every model sees the same ids)."""
    ids = [model.tokenizer.encode(t) for t in TEXTS]
    ids += [model.encode_chat(c, add_generation_prompt=False) for c in CHATS]
    return [ids[0], ids[2], ids[1], ids[3]]  # en text, en chat, zh text, zh chat


def logits(model: Model, ids: list[list[int]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model.logits(x) for x in ids]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    """Top-1 agreement over all positions and mean KL(ref || got) per position (nats)."""
    r, g = torch.cat(ref).double(), torch.cat(got).double()
    top1 = (r.argmax(-1) == g.argmax(-1)).double().mean().item()
    lr, lg = r.log_softmax(-1), g.log_softmax(-1)
    kl = (lr.exp() * (lr - lg)).sum(-1).mean().item()
    return top1, kl


def held_as(net: torch.nn.Module) -> tuple[str, list[str]]:
    """A short summary of the quantized layers (kind, group size) and a line per kind naming them."""
    names: dict[int, list[str]] = defaultdict(list)
    mods: dict[int, torch.nn.Module] = {}
    for name, mod in net.named_modules(remove_duplicate=False):
        if isinstance(mod, (Int4Linear, Int8Linear)) or type(mod) is torch.nn.Linear:
            names[id(mod)].append(name.rsplit(".", 1)[-1])
            mods[id(mod)] = mod
    kinds: dict[str, Counter] = defaultdict(Counter)
    for key, mod in mods.items():
        label = "lm_head=embedding" if {"lm_head", "source"} <= set(names[key]) else names[key][0]
        if isinstance(mod, Int4Linear):
            kind = f"Int4Linear g{mod.group_size}"
        elif isinstance(mod, Int8Linear):
            g = "per-row" if mod.group_size == mod.in_features else f"g{mod.group_size}"
            kind = f"Int8Linear {g}"
        else:
            kind = f"float Linear ({next(mod.parameters()).dtype})".replace("torch.", "")
        kinds[kind][label] += 1
    short = ", ".join(f"{kind} x{sum(c.values())}" for kind, c in sorted(kinds.items())) or "float only"
    lines = [f"{kind}: " + ", ".join(f"{n} x{k}" for n, k in sorted(c.items())) for kind, c in sorted(kinds.items())]
    return short, lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bench = home() / "bench"
    cache = bench / "smollm2-formats"
    cache.mkdir(parents=True, exist_ok=True)
    gguf = Path(fetch(DEFAULT_GGUF))
    src = source_folder(gguf, cache / "f32-hf")
    llama = fetch_llama_cpp(bench)
    exe = build_quantize(llama, bench / f"llama.cpp-{LLAMA_CPP_PYTHON}-build")
    f16 = convert_f16(llama, src, cache / "f16.gguf")
    ggufs = [(f"{gguf.name} (as shipped)", gguf), ("F16 (baseline: float weights)", f16)]
    ggufs += [(kind, llama_quantize(exe, f16, cache / f"{kind}.gguf", kind)) for kind in GGUF_TYPES]
    # (label, quantized model path, its float reference path, tensor types in the file)
    cases = [(label, p, p, " ".join(f"{t} {n}" for t, n in sorted(tensor_types(p).items()))) for label, p in ggufs]
    cases.append(("float32 source (baseline: bf16 compute only)", src, src, "(HF folder) F32"))
    for bits in HF_BITS:
        folder = hf_quantized(src, cache / f"hf-int{bits}", bits)
        cases.append((f"quantize_folder bits={bits}", folder, src, "(HF folder)"))

    source = qianwen.load(str(src), dtype="float32", quantized=False)
    ids = prompts(source)
    lengths = [len(x) for x in ids]
    step(f"prompt lengths {lengths} tokens (kernel path below {PREFILL_TOKENS}), {sum(lengths)} positions")
    if max(lengths) >= PREFILL_TOKENS:
        step(f"note: a prompt of {PREFILL_TOKENS}+ tokens runs the prefill path (dequantize + bf16 matmul)")
    base = logits(source, ids)
    del source

    rows, details = [], []
    for label, path, ref_path, types in cases:
        t0 = time.perf_counter()
        ref = base if ref_path == src else logits(qianwen.load(str(ref_path), dtype="float32", quantized=False), ids)
        if path.suffix == ".gguf":
            model = qianwen.load(str(path), dtype="bfloat16", quantized=True)
        else:
            model = qianwen.load(str(path), dtype="bfloat16")
        got = logits(model, ids)
        short, lines = held_as(model.net)
        del model
        top1, kl = compare(ref, got)
        s_top1, s_kl = compare(base, got)
        step(f"{label}: top-1 {top1:.2%}, KL {kl:.2e} vs its float; vs source {s_top1:.2%}, {s_kl:.2e} "
             f"({time.perf_counter() - t0:.1f} s)")
        rows.append((label, types, short, sum(lengths), top1, kl, s_top1, s_kl))
        details.append((label, lines))

    print("\nLayers held quantized (modules by name; lm_head=embedding is the tied embedding and lm_head):")
    for label, lines in details:
        print(f"- {label}: " + ("; ".join(lines) or "no quantized layers"))
    print("\n| format | tensor types in the file | held as | positions | top-1 agreement | mean KL "
          "| top-1 vs source | mean KL vs source |")
    print("|---|---|---|---|---|---|---|---|")
    for label, types, short, n, top1, kl, s_top1, s_kl in rows:
        print(f"| {label} | {types} | {short} | {n} | {top1:.2%} | {_sci(kl)} | {s_top1:.2%} | {_sci(s_kl)} |")
    print(f"\ntorch {torch.__version__}, {args.threads} threads; quantized models in bfloat16, references in "
          f"float32; KL in nats, reference || quantized. Files in {cache}")
    return 0


def _sci(x: float) -> str:
    return f"{x:.1e}" if x > 0 or not math.isfinite(x) else "0"  # rounding can make an exact 0 a tiny -1e-17


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        print(f"quant_agreement: command failed ({e.returncode}): {' '.join(map(str, e.cmd))}", *err,
              sep="\n", file=sys.stderr)
        sys.exit(1)
