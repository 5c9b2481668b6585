"""loss.png from a run's log.jsonl: training loss per step (and held-out loss where evaluated)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def plot_log(log: str | os.PathLike, out: str | os.PathLike, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss, ev_steps, ev = [], [], [], []
    for line in Path(log).read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        steps.append(r["step"])
        loss.append(r["loss"])
        if "eval_loss" in r:
            ev_steps.append(r["step"])
            ev.append(r["eval_loss"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, lw=1, label="train loss")
    if ev:
        ax.plot(ev_steps, ev, "o-", ms=3, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(log).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
