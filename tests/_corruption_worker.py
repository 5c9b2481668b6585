"""Worker for test_corruption.py: loads corrupt checkpoints one after another and reports each outcome.

Run as `python tests/_corruption_worker.py CASES.json START`. For each case from START it prints one JSON
line {"start": i}, builds the corrupt file (GGUF cases: the original's header with the case's edits,
re-padded to the 32-byte alignment, then the original tensor data, flipped bytes, a truncation), loads it,
runs a two-token chat and the highest token id of the tokenizer through the model, then prints
{"i": i, "outcome": "ok" | "error" | "traceback", "detail": ...}. A hang or a crash shows as a missing
result line; the test restarts the worker after that case.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def build_gguf(case: dict, original: bytes, out: Path) -> Path:
    head = bytearray(original[:case["info_end"]])
    for off, length, data in sorted(case.get("edits", []), key=lambda e: -e[0]):
        head[off:off + length] = bytes.fromhex(data)
    body = bytearray(head + b"\0" * (-len(head) % 32))
    body += original[case["data_offset"]:]
    for off, xor in case.get("flips", []):
        body[off] ^= xor
    if case.get("truncate") is not None:
        del body[case["truncate"]:]
    out.write_bytes(body)
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
    originals: dict[str, bytes] = {}
    scratch = Path(sys.argv[1]).with_suffix(".gguf")
    for i in range(start, len(cases)):
        case = cases[i]
        print(json.dumps({"start": i}), flush=True)
        if case["kind"] == "gguf":
            if case["base"] not in originals:
                originals[case["base"]] = Path(case["base"]).read_bytes()
            path = build_gguf(case, originals[case["base"]], scratch)
        else:
            path = Path(case["path"])
        try:
            probe(case, path)
            result = {"outcome": "ok", "detail": ""}
        except QianwenError as e:
            result = {"outcome": "error", "detail": str(e)}
        except BaseException as e:  # noqa: BLE001 (what the test looks for)
            tb = traceback.extract_tb(e.__traceback__)[-1]
            result = {"outcome": "traceback",
                      "detail": f"{type(e).__name__}: {str(e)[:300]} at {Path(tb.filename).name}:{tb.lineno}"}
        print(json.dumps({"i": i, **result}), flush=True)
    scratch.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
