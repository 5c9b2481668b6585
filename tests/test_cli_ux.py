"""The `qianwen` command as a new user meets it: names from `qianwen list` work with `-m`, a bad name or
an unavailable device is one line, and commands that need no model start without importing torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from qianwen.cli.main import main
from qianwen.errors import QianwenError
from qianwen.loading.hub import resolve


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qianwen.cli.main", *args], capture_output=True, text=True,
                          timeout=300, input=stdin, env={**os.environ, **(env or {})})


@pytest.fixture
def home(tmp_path, tiny_qwen2_dir, default_gguf, monkeypatch):
    """A $QIANWEN_HOME holding a GGUF file, a hub folder and a ModelScope folder."""
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    (models / default_gguf.name).symlink_to(default_gguf)
    shutil.copytree(tiny_qwen2_dir, models / "Org--tiny-chat")
    shutil.copytree(tiny_qwen2_dir, models / "modelscope--Org--tiny-ms")
    monkeypatch.setenv("QIANWEN_HOME", str(models.parent))
    return models


def listed_names(home) -> list[str]:
    r = cli("list")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[1:]  # under the NAME SIZE PATH header
    return [row.split()[0] for row in rows]


def test_every_name_list_prints_is_accepted_by_m(home):
    names = listed_names(home)
    assert len(names) == 3
    for name in names:
        assert resolve(name).parent == home, name


def test_list_names_resolve_to_their_own_entries(home, default_gguf):
    assert resolve("SmolLM2-135M-Instruct.Q4_1.gguf") == home / default_gguf.name
    assert resolve("SmolLM2-135M-Instruct.Q4_1") == home / default_gguf.name  # the server's model id
    assert resolve("Org/tiny-chat") == home / "Org--tiny-chat"
    assert resolve("modelscope:Org/tiny-ms") == home / "modelscope--Org--tiny-ms"
    assert resolve("tiny-chat") == home / "Org--tiny-chat"  # the server's id for Org/tiny-chat
    assert "modelscope:Org/tiny-ms" in listed_names(home)


def test_a_server_id_two_cached_models_share_is_not_guessed(home):
    shutil.copytree(home / "Org--tiny-chat", home / "Other--tiny-chat")
    with pytest.raises(QianwenError, match="did you mean -m Org/tiny-chat or -m Other/tiny-chat"):
        resolve("tiny-chat")


def test_info_runs_on_a_listed_gguf_name(home):
    r = cli("info", "-m", "SmolLM2-135M-Instruct.Q4_1.gguf", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "SmolLM2-135M-Instruct.Q4_1" in r.stdout


def test_unknown_name_is_one_line_with_close_matches(home):
    r = cli("info", "-m", "SmolLM2-135M-Instruct.Q4_0.gguf")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "does not exist" in r.stderr and "-m SmolLM2-135M-Instruct.Q4_1.gguf" in r.stderr


def test_missing_path_suggests_the_cached_file_of_that_name(home):
    r = cli("info", "-m", "./SmolLM2-135M-Instruct.Q4_1.gguf")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "-m SmolLM2-135M-Instruct.Q4_1.gguf" in r.stderr


def test_unknown_hub_style_name_suggests_a_cached_one(home, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no hub here: the error must still be one line
    r = cli("info", "-m", "Org/tiny-chatt")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "could not download" in r.stderr and "-m Org/tiny-chat?" in r.stderr


unavailable = ["cuda:99", "mps", "nonsense", "cuda:-1"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", unavailable)
@pytest.mark.parametrize("command", [["generate", "hi"], ["info"], ["eval", "--task", "perplexity", "--data"]])
def test_unavailable_device_is_one_line_before_loading(device, command, tmp_path, capsys):
    broken = tmp_path / "broken"  # loading this would fail with a different error: the device is checked first
    broken.mkdir()
    (broken / "config.json").write_text("[not json")
    if command[0] == "eval":
        (tmp_path / "book.txt").write_text("Some text to score. " * 50)
        command = [*command, str(tmp_path / "book.txt")]
    rc = main([*command, "-m", str(broken), "--device", device])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "device" in err and device.split(":")[0] in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the error a machine without CUDA gives")
def test_train_on_cuda_without_cuda_is_one_line(tmp_path, capsys):
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"instruction": "hi", "output": "hello"}]))
    rc = main(["train", "sft", "-d", str(data), "-o", str(tmp_path / "out"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "cuda" in err


def test_unknown_dtype_is_one_line(capsys):
    rc = main(["info", "-m", "/nonexistent/model", "--dtype", "int8"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "dtype" in err


# Each entry: argv for main(). Every command module must be importable and parse without torch.
NO_MODEL = [["--help"], [], ["list"], ["generate", "--bogus-flag"], ["chat", "--max-tokens", "many"],
            ["data"], ["train", "sft"]]
NO_MODEL += [[c, "--help"] for c in ("pull", "list", "info", "generate", "chat", "serve", "convert",
                                      "quantize", "data", "tokenizer", "train", "merge", "eval")]


def test_commands_that_need_no_model_do_not_import_torch(tmp_path):
    code = f"""
import contextlib, io, json, sys
import qianwen
from qianwen.cli.main import main
from qianwen.errors import QianwenError
heavy = ("torch", "numpy", "transformers", "tokenizers", "fastapi", "safetensors")
found = {{}}
for argv in {NO_MODEL!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    loaded = [m for m in heavy if m in sys.modules]
    if loaded:
        found[" ".join(argv)] = loaded
        break
print(json.dumps(found))
"""
    env = {**os.environ, "QIANWEN_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {}


def test_import_qianwen_is_light_and_model_is_still_reachable():
    code = ("import sys, qianwen; light = 'torch' not in sys.modules; "
            "from qianwen import Model; import qianwen.api; "
            "print(light, Model is qianwen.api.Model, callable(qianwen.load))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "True"]


def test_usage_errors_exit_2_in_one_line():
    r = cli("generate", "--temperature")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("qianwen generate: error:")
