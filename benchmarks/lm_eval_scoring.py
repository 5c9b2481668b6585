"""lm-evaluation-harness scoring a small local multiple-choice task against `qianwen serve`, and its
log-likelihoods compared with `Model.logits` on the same tokens.

lm-eval pulls many packages, so it lives in its own environment:

    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0 && /tmp/lmeval-venv/bin/pip install "lm-eval[api]"
    python benchmarks/lm_eval_scoring.py --lm-eval-python /tmp/lmeval-venv/bin/python [-m MODEL]

It starts `qianwen serve` on a free port, runs lm-eval's `local-completions` model on the task below
(through lm-eval's Python API, recording the request bodies it sends), then loads the model here and
recomputes every (context, continuation) log-likelihood with `Model.logits`. lm-eval finds the server's
/tokenize route and tokenizes with the served model's own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

TASK = "qianwen_mini_mc"
# (question, choices, index of the answer): general knowledge a small model may know, English and Chinese
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("What is the capital of Japan?", ["Beijing", "Seoul", "Tokyo", "Bangkok"], 2),
    ("What is the capital of Italy?", ["Rome", "Vienna", "Athens", "Lisbon"], 0),
    ("What is the largest planet in the solar system?", ["Mars", "Jupiter", "Venus", "Mercury"], 1),
    ("Which planet is known as the Red Planet?", ["Earth", "Saturn", "Mars", "Neptune"], 2),
    ("How many days are there in a week?", ["five", "six", "seven", "ten"], 2),
    ("What is 2 + 2?", ["3", "4", "5", "22"], 1),
    ("What is 10 times 10?", ["100", "20", "1000", "110"], 0),
    ("What color is the sky on a clear day?", ["green", "blue", "red", "black"], 1),
    ("What do bees make?", ["milk", "silk", "honey", "wool"], 2),
    ("Which animal is known as the king of the jungle?", ["the lion", "the mouse", "the cow", "the frog"], 0),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
    ("Which gas do plants absorb from the air?", ["oxygen", "helium", "carbon dioxide", "neon"], 2),
    ("What is the opposite of hot?", ["cold", "warm", "big", "fast"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("Which ocean is the largest?", ["the Atlantic", "the Indian", "the Arctic", "the Pacific"], 3),
    ("Who wrote Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Mark Twain", "Jane Austen"], 1),
    ("What is the boiling point of water in degrees Celsius?", ["50", "100", "150", "0"], 1),
    ("Which language is spoken in Brazil?", ["Spanish", "French", "Portuguese", "German"], 2),
    ("What is the chemical symbol for gold?", ["Au", "Ag", "Fe", "Go"], 0),
    ("中国的首都是哪里？", ["北京", "上海", "广州", "深圳"], 0),
    ("一年有几个月？", ["十个月", "十二个月", "六个月", "八个月"], 1),
    ("太阳从哪个方向升起？", ["西方", "北方", "东方", "南方"], 2),
    ("水的化学式是什么？", ["CO2", "H2O", "O2", "NaCl"], 1),
]

TASK_YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

# run under lm-eval's own Python: the evaluation through its API, recording the bodies it posts
DRIVER = r'''
import json, sys
from lm_eval import simple_evaluate
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.tasks import TaskManager

cfg = json.loads(sys.argv[1])
payloads = []
original = LocalCompletionsAPI._create_payload

def record(self, *args, **kwargs):
    body = original(self, *args, **kwargs)
    payloads.append(body)
    return body

LocalCompletionsAPI._create_payload = record
out = simple_evaluate(model="local-completions", model_args=cfg["model_args"], tasks=[cfg["task"]],
                      task_manager=TaskManager(include_path=cfg["tasks_dir"]), batch_size=cfg["batch_size"],
                      log_samples=True)
samples = [{"doc": s["doc"], "target": s["target"], "arguments": s["arguments"], "resps": s["resps"]}
           for s in out["samples"][cfg["task"]]]
json.dump({"results": out["results"][cfg["task"]], "samples": samples, "payloads": payloads[:2],
           "n_payloads": len(payloads), "lm_eval_version": __import__("lm_eval").__version__},
          open(cfg["out"], "w"), default=str, ensure_ascii=False)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair: trailing spaces of the context move to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    return tok.encode(context), tok.encode(continuation)


def reference(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The continuation's log-likelihood and whether each of its tokens is a most likely one (ties count,
    as in lm-eval, which compares the token's logprob with the best one)."""
    ids = context + continuation
    lp = torch.log_softmax(model.logits(ids).float(), dim=-1)
    rows = range(len(context) - 1, len(ids) - 1)
    return sum(float(lp[k, ids[k + 1]]) for k in rows), all(lp[k, ids[k + 1]] == lp[k].max() for k in rows)


def pairs(arguments) -> tuple[str, str]:
    if isinstance(arguments, dict):  # lm-eval 0.4.x logs {"gen_args_0": {"arg_0": ctx, "arg_1": cont}}
        return arguments["arg_0"], arguments["arg_1"]
    return arguments[0], arguments[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-eval-python", default="/tmp/lmeval-venv/bin/python")
    ap.add_argument("-m", "--model", default=None, help="model for qianwen serve (default: the default model)")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per request lm-eval sends")
    ap.add_argument("--out", default=None, help="write the full report (JSON) here")
    args = ap.parse_args()

    import qianwen

    work = Path(tempfile.mkdtemp(prefix="qianwen-lmeval-"))
    data = work / "mini_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}, ensure_ascii=False) + "\n"
                            for q, c, a in QUESTIONS))
    (work / "tasks").mkdir()
    (work / "tasks" / f"{TASK}.yaml").write_text(TASK_YAML.replace("{data}", str(data)))
    port, name = free_port(), "scored"
    serve = [sys.executable, "-m", "qianwen.cli.main", "serve", "--port", str(port), "--served-model-name", name,
             "--log-level", "warning"] + (["--model", args.model] if args.model else [])
    log = open(work / "serve.log", "w")
    server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if server.poll() is not None:
                sys.exit(f"qianwen serve exited:\n{(work / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        cfg = {"model_args": f"model={name},base_url={base}/v1/completions,num_concurrent=1,max_retries=1",
               "task": TASK, "tasks_dir": str(work / "tasks"), "batch_size": args.batch_size,
               "out": str(work / "lm_eval.json")}
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        (work / "driver.py").write_text(DRIVER)
        t0 = time.perf_counter()
        subprocess.run([args.lm_eval_python, str(work / "driver.py"), json.dumps(cfg)], env=env, check=True)
        seconds = time.perf_counter() - t0
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    run = json.loads((work / "lm_eval.json").read_text())

    model = qianwen.load(args.model) if args.model else qianwen.load()
    tok = model.tokenizer
    diffs, greedy_same, ref_correct, served_correct = [], 0, 0, 0
    for s in run["samples"]:
        served = [r[0] for r in s["resps"]]  # [logprob, is_greedy] per choice
        ref = [reference(model, *encode_pair(tok, *pairs(a))) for a in s["arguments"]]
        diffs += [abs(float(g[0]) - r[0]) for g, r in zip(served, ref, strict=True)]
        greedy_same += sum(bool(g[1]) == r[1] for g, r in zip(served, ref, strict=True))
        target = int(s["target"])
        served_correct += max(range(len(served)), key=lambda i: float(served[i][0])) == target
        ref_correct += max(range(len(ref)), key=lambda i: ref[i][0]) == target
    n_docs, n_ll = len(run["samples"]), len(diffs)
    report = {
        "lm_eval": run["lm_eval_version"], "task": TASK, "docs": n_docs, "loglikelihoods": n_ll,
        "model": model.name, "dtype": str(model.dtype).replace("torch.", ""),
        "acc": run["results"].get("acc,none"), "acc_norm": run["results"].get("acc_norm,none"),
        "acc_from_model_logits": ref_correct / n_docs, "acc_recomputed_from_served": served_correct / n_docs,
        "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / n_ll, "is_greedy_agree": greedy_same / n_ll,
        "lm_eval_seconds": round(seconds, 1), "requests": run["n_payloads"], "first_request": run["payloads"][0],
        "cpu": cpu_model(), "load_avg": os.getloadavg(),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "first_request"}, indent=1))
    print("first request lm-eval sent:", json.dumps(report["first_request"])[:600])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
