"""Shared helpers for the training tests: a tiny bilingual corpus, a tiny BPE tokenizer, shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EN = ["The cat sat on the mat.", "A river runs through the old town.", "We planted trees in spring.",
      "Numbers like 12 and 345 are split into digits.", "She reads a book every night."]
ZH = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "学而时习之，不亦说乎？", "春眠不觉晓，处处闻啼鸟。",
      "今天天气很好，我们去公园散步。"]


def write_corpus(path: Path, n_docs: int = 60) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            text = "\n".join([EN[i % 5], ZH[(i * 2) % 5], EN[(i + 3) % 5], ZH[(i + 1) % 5]])
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def make_tokenizer(folder: Path, vocab_size: int = 384) -> Path:
    from qianwen.train.bpe import train_tokenizer

    corpus = write_corpus(folder / "corpus.jsonl")
    return train_tokenizer([str(corpus)], folder / "tok", vocab_size=vocab_size, progress=False)


def make_shards(folder: Path) -> tuple[Path, Path]:
    """(tokenizer folder, shard folder)"""
    from qianwen.tokenizer import load_tokenizer
    from qianwen.train.prepare import prepare

    tok_dir = make_tokenizer(folder)
    # small shards (~3.3K train tokens in 4): training windows cross memory-mapped shard boundaries
    prepare([str(folder / "corpus.jsonl")], folder / "shards", load_tokenizer(tok_dir), progress=False,
            val_fraction=0.1, shard_tokens=1000)
    return tok_dir, folder / "shards"


def make_base(folder: Path) -> Path:
    """A tiny random qwen2 checkpoint with the small tokenizer, exported like a training run does."""
    from qianwen.loading.export import export_hf
    from qianwen.tokenizer import load_tokenizer
    from qianwen.train.presets import preset_config
    from qianwen.train.pretrain import build_net

    tok = load_tokenizer(make_tokenizer(folder))
    config = preset_config("tiny", tok.vocab_size, eos_token_id=tok.eos_id)
    return export_hf(folder / "base", config, build_net(config, seed=1).state_dict(), tok)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # the same kernels in every run, alone or under torchrun
    return env


def pretrain_cmd(tok: Path, shards: Path, out: Path, *extra: str, torchrun: int = 0) -> list[str]:
    args = ["train", "pretrain", "-d", str(shards), "-t", str(tok), "-o", str(out), "--preset", "tiny",
            "--seq-len", "32", "--global-batch", "4", "--micro-batch", "2", "--lr", "1e-2", "--dtype", "float32",
            "--eval-every", "0", "--no-progress", *extra]
    return cli_cmd(args, torchrun)


def cli_cmd(args: list[str], torchrun: int = 0) -> list[str]:
    """`qianwen ARGS` in a fresh process, or under torchrun with `torchrun` CPU processes."""
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
                "-m", "qianwen.cli.main", *args]
    return [sys.executable, "-m", "qianwen.cli.main", *args]


def run_here(cmd: list[str]) -> None:
    """Run a `cli_cmd` (no torchrun) in this process, one thread like the subprocesses: saves a start-up."""
    import torch

    from qianwen.cli.main import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(cmd[cmd.index("qianwen.cli.main") + 1:]) == 0
    finally:
        torch.set_num_threads(n)


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in recs}
