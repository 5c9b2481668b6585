"""Bad checkpoints give one clear error line, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import qianwen
from qianwen.errors import ModelLoadError, QianwenError


@pytest.fixture
def folder(tiny_qwen2_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_qwen2_dir, dst)
    return dst


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_path():
    with pytest.raises(QianwenError, match="does not exist"):
        qianwen.load("/nonexistent/model/folder")


def test_unknown_model_type_lists_supported(folder):
    edit_config(folder, model_type="gpt_neox")
    with pytest.raises(ModelLoadError, match="unknown model_type 'gpt_neox'.*llama, qwen, qwen2, qwen3"):
        qianwen.load(folder, dtype="float32")


def test_missing_config_key(folder):
    edit_config(folder, hidden_size=None)
    with pytest.raises(ModelLoadError, match="missing 'hidden_size'"):
        qianwen.load(folder, dtype="float32")


def test_truncated_safetensors(folder):
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated|corrupt"):
        qianwen.load(folder, dtype="float32")


def test_garbage_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="safetensors"):
        qianwen.load(folder, dtype="float32")


def test_missing_tensor_is_named(folder):
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        qianwen.load(folder, dtype="float32")


def test_wrong_shape_is_named(folder):
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \(3, 3\)"):
        qianwen.load(folder, dtype="float32")


def test_truncated_gguf(default_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    with open(default_gguf, "rb") as src:
        bad.write_bytes(src.read(5_000_000))
    with pytest.raises(ModelLoadError, match="GGUF"):
        qianwen.load(bad, dtype="float32")


def test_cli_error_is_one_line_exit_1(folder):
    edit_config(folder, model_type="bloom")
    r = subprocess.run([sys.executable, "-m", "qianwen.cli.main", "info", "-m", str(folder)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: unknown model_type 'bloom'")
    assert "Traceback" not in r.stderr
