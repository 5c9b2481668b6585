"""The `qianwen` command on a tiny checkpoint: chat from a pipe, generate, info, history trimming."""

from __future__ import annotations

import os
import subprocess
import sys

import qianwen
from qianwen.chat.history import fit_history


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qianwen.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_chat_from_pipe_answers_each_line_and_exits(tiny_qwen2_dir):
    r = run_cli("chat", "-m", str(tiny_qwen2_dir), "--dtype", "float32", "--max-tokens", "5", "--seed", "1",
                stdin="hello\n\nhow are you\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2  # one answer line per non-empty input line


def test_generate_is_deterministic_with_seed(tiny_qwen2_dir):
    a = run_cli("generate", "The quick", "-m", str(tiny_qwen2_dir), "--dtype", "float32", "--max-tokens", "8",
                "--seed", "7", "--temperature", "1.0")
    b = run_cli("generate", "-m", str(tiny_qwen2_dir), "--dtype", "float32", "--max-tokens", "8",
                "--seed", "7", "--temperature", "1.0", stdin="The quick")
    assert a.returncode == 0 and b.returncode == 0
    assert a.stdout == b.stdout


def test_info_reports_architecture(tiny_qwen2_dir):
    r = run_cli("info", "-m", str(tiny_qwen2_dir), "--dtype", "float32")
    assert r.returncode == 0
    assert "qwen2" in r.stdout and "context length" in r.stdout


def test_history_drops_oldest_turns_keeps_system():
    msgs = [{"role": "system", "content": "S"}]
    for i in range(5):
        msgs += [{"role": "user", "content": f"u{i}" * 10}, {"role": "assistant", "content": f"a{i}" * 10}]
    msgs.append({"role": "user", "content": "last"})
    fitted = fit_history(msgs, lambda ms: sum(len(m["content"]) for m in ms), 70)
    assert fitted[0]["role"] == "system" and fitted[-1]["content"] == "last"
    assert fitted[1]["role"] == "user" and len(fitted) < len(msgs)
    assert sum(len(m["content"]) for m in fitted) <= 70


def test_user_text_with_control_tokens_stays_plain(tiny_qwen2_dir):
    m = qianwen.load(tiny_qwen2_dir, dtype="float32")
    im_end = m.tokenizer.token_to_id("<|im_end|>")
    ids = m.encode_chat([{"role": "user", "content": "hi <|im_end|> there"}])
    normal = m.encode_chat([{"role": "user", "content": "hi there"}])
    assert ids.count(im_end) == normal.count(im_end) == 1


def test_stop_strings_are_never_emitted(tiny_qwen2_dir):
    m = qianwen.load(tiny_qwen2_dir, dtype="float32")
    full = m.generate("The quick brown", max_tokens=20, temperature=0, ignore_eos=True)
    assert len(full) > 4
    stop = full[2:4]
    cut = m.generate("The quick brown", max_tokens=20, temperature=0, ignore_eos=True, stop=[stop])
    assert cut == full[: full.find(stop)]
    streamed = "".join(m.generate("The quick brown", max_tokens=20, temperature=0, ignore_eos=True, stop=[stop],
                                  stream=True))
    assert streamed == cut


def test_batch_of_prompts_and_seed(tiny_qwen2_dir):
    m = qianwen.load(tiny_qwen2_dir, dtype="float32")
    outs = m.generate(["one", "two"], max_tokens=5, seed=3, temperature=1.0)
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0] == m.generate("one", max_tokens=5, seed=3, temperature=1.0)



def test_pull_without_hub_says_so(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "QIANWEN_HOME": str(home), "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "qianwen.cli.main", "pull", "Qwen/Qwen2.5-0.5B-Instruct"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1
    assert "could not download 'Qwen/Qwen2.5-0.5B-Instruct'" in r.stderr and "local folder" in r.stderr
    assert not (home / "models" / "Qwen--Qwen2.5-0.5B-Instruct").exists()


def test_list_shows_cached_models(tmp_path):
    home = tmp_path / "home"
    (home / "models" / "Org--tiny").mkdir(parents=True)
    (home / "models" / "Org--tiny" / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "qianwen.cli.main", "list"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "QIANWEN_HOME": str(home)})
    assert r.returncode == 0 and "Org/tiny" in r.stdout


def test_a_loaded_model_is_left_out_of_garbage_collections(tiny_qwen2_dir):
    """After the commands' load, a full collection no longer walks the model's objects (cli/common.py
    `freeze_heap`): they sit in the permanent generation, which gc.get_objects() does not list."""
    import argparse
    import gc

    from qianwen.cli.common import load_model

    try:
        model = load_model(argparse.Namespace(model=str(tiny_qwen2_dir), dtype="float32", device="cpu"))
        assert gc.get_freeze_count() > 0
        assert not any(o is model.net for o in gc.get_objects())
    finally:
        gc.unfreeze()
