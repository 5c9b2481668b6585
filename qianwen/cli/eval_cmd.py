"""`qianwen eval`: standard benchmarks (MMLU, CMMLU, C-Eval, GSM8K, HumanEval) and perplexity."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..eval.registry import tasks  # light: the task modules import torch only when they run

    p = subparsers.add_parser(
        "eval", help="evaluate a model on a benchmark",
        description="Evaluate a model on a standard benchmark. Task data is fetched on first use "
                    "(MMLU, GSM8K, HumanEval) or read from --data (CMMLU, C-Eval, perplexity, or any task "
                    "in its standard format).")
    p.add_argument("--model", "-m", default=None, help="a folder, a .gguf file or a name (default model if omitted)")
    p.add_argument("--task", "-t", required=True, choices=list(tasks()))
    p.add_argument("--data", default=None, help="local data: a file or folder in the task's standard format")
    p.add_argument("--limit", type=int, default=None,
                   help="multiple choice: a fixed seeded sample of N questions per subject; otherwise the first N")
    p.add_argument("--shots", type=int, default=None, help="few-shot exemplars (default: 5, GSM8K 8, HumanEval 0)")
    p.add_argument("--chat", action="store_true", help="prompt through the model's chat template (chat models)")
    p.add_argument("--out", default=None, help="write the full result (with per-item records) to this JSON file")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward (multiple choice) or sequences decoded together "
                        "(GSM8K, HumanEval; 1 = one at a time)")
    p.add_argument("--samples", type=int, default=1, help="HumanEval: completions per task (pass@k for k <= n)")
    p.add_argument("--temperature", type=float, default=0.8, help="HumanEval sampling temperature when --samples > 1")
    p.add_argument("--workers", type=int, default=None, help="HumanEval: programs run in parallel (sandbox users)")
    p.add_argument("--timeout", type=float, default=10.0, help="HumanEval: seconds per program")
    p.add_argument("--window", type=int, default=None, help="perplexity: tokens per window (default 1024)")
    p.add_argument("--stride", type=int, default=None, help="perplexity: window step (default window/2)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the device's best)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    import qianwen

    from ..errors import QianwenError
    from ..eval import report, runner

    for name in ("limit", "batch_size", "samples", "workers", "window", "stride", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise QianwenError(f"--{name.replace('_', '-')} must be at least 1")
    if args.timeout <= 0:
        raise QianwenError("--timeout must be positive")
    runner.check_args(args.task, args.data, args.limit, args.shots, args.temperature)
    if args.threads:  # the flag wins over $QIANWEN_THREADS: loading applies the variable
        os.environ["QIANWEN_THREADS"] = str(args.threads)
    model = qianwen.load(args.model, dtype=args.dtype, device=args.device)
    result = runner.run(model, args.task, data=args.data, limit=args.limit, shots=args.shots, chat=args.chat,
                        batch_size=args.batch_size, samples=args.samples, temperature=args.temperature,
                        workers=args.workers, timeout_s=args.timeout, window=args.window, stride=args.stride,
                        log=lambda s: print(s, file=sys.stderr))
    print(report.markdown(result))
    if args.out:
        report.write_json(args.out, result)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
