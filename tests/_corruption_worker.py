"""Worker for test_corruption.py: loads corrupt checkpoints one after another and reports each outcome.

Run as `python tests/_corruption_worker.py CASES.json START SCRATCH` (SCRATCH: where GGUF cases are written). For each case from START it prints one JSON
line {"start": i}, builds the corrupt file (GGUF cases: the original's header with the case's edits,
re-padded to the 32-byte alignment, then the original tensor data, flipped bytes, a truncation), loads it,
runs a two-token chat and the highest token id of the tokenizer through the model, then prints
{"i": i, "outcome": "ok" | "error" | "traceback", "detail": ...}. A hang or a crash shows as a missing
result line; the test restarts the worker after that case.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def build_gguf(case: dict, original: memoryview, out: Path) -> Path:
    head = bytearray(original[:case["info_end"]])
    for off, length, data in sorted(case.get("edits", []), key=lambda e: -e[0]):
        head[off:off + length] = bytes.fromhex(data)
    head += b"\0" * (-len(head) % 32)
    cut = case.get("truncate")
    with open(out, "w+b") as f:
        if cut is not None and cut <= len(head):
            f.write(head[:cut])
            return out
        f.write(head)
        f.write(original[case["data_offset"]:])
        for off, xor in case.get("flips", []):
            f.seek(off)
            byte = f.read(1)[0]
            f.seek(off)
            f.write(bytes([byte ^ xor]))
        if cut is not None:
            f.truncate(cut)
    return out


def probe(case: dict, path: Path) -> None:
    import qianwen

    kw = {}
    if case.get("quantized") is not None:  # GGUF: both weight paths
        kw = {"quantized": case["quantized"], "dtype": "bfloat16" if case["quantized"] else "float32"}
    m = qianwen.load(path, **kw)
    m.chat([{"role": "user", "content": "Hi, 你好"}], max_tokens=2, temperature=0)
    m.logits([m.tokenizer.vocab_size - 1])  # every id the tokenizer can produce has an embedding row


def main() -> None:
    from qianwen.errors import QianwenError

    cases = json.loads(Path(sys.argv[1]).read_text())
    start = int(sys.argv[2])
    originals: dict[str, memoryview] = {}
    scratch = Path(sys.argv[3])
    for i in range(start, len(cases)):
        case = cases[i]
        print(json.dumps({"start": i}), flush=True)
        if case["kind"] == "gguf":
            if case["base"] not in originals:
                originals[case["base"]] = memoryview(Path(case["base"]).read_bytes())
            path = build_gguf(case, originals[case["base"]], scratch)
        else:
            path = Path(case["path"])
        t0 = time.monotonic()
        try:
            probe(case, path)
            result = {"outcome": "ok", "detail": ""}
        except QianwenError as e:
            result = {"outcome": "error", "detail": str(e)}
        except BaseException as e:  # noqa: BLE001 (what the test looks for)
            tb = traceback.extract_tb(e.__traceback__)[-1]
            result = {"outcome": "traceback",
                      "detail": f"{type(e).__name__}: {str(e)[:300]} at {Path(tb.filename).name}:{tb.lineno}"}
        print(json.dumps({"i": i, "seconds": round(time.monotonic() - t0, 2), **result}), flush=True)


if __name__ == "__main__":
    main()
