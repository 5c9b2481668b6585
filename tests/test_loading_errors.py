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
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith(f"error: {folder}: unknown model_type 'bloom'")
    assert "Traceback" not in r.stderr


# ---- values and agreement checked before the model is built (issue 10 item 4; more in test_corruption.py) ----

def test_config_that_is_not_an_object(folder):
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=r"config.json holds list .*not a JSON object"):
        qianwen.load(folder, dtype="float32")


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, r"'num_attention_heads' is 0; expected an integer from 1"),
    ({"num_attention_heads": 3}, r"hidden size 64 is not a multiple of the 3 attention heads"),
    ({"num_key_value_heads": 3}, r"4 attention heads are not a multiple of the 3 key/value heads"),
    ({"hidden_size": "64"}, r"'hidden_size' is '64'; expected an integer"),
    ({"intermediate_size": [128, 128]}, r"'intermediate_size' is \[128, 128\]; expected an integer"),
    ({"rms_norm_eps": "x"}, r"'rms_norm_eps' is 'x'; expected a finite number"),
    ({"rope_scaling": "linear"}, r"'rope_scaling' is 'linear'; expected an object"),
    ({"rope_scaling": {"type": "linear"}}, r"rope scaling \(linear\) 'factor' is None"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"'low_freq_factor' is None"),
    ({"eos_token_id": [2, "a"]}, r"'eos_token_id' is 'a'; expected an integer from 0"),
    ({"tie_word_embeddings": "no"}, r"'tie_word_embeddings' is 'no'; expected true or false"),
])
def test_bad_config_value_is_named(folder, changes, message):
    edit_config(folder, **changes)
    with pytest.raises(ModelLoadError, match=message) as e:
        qianwen.load(folder, dtype="float32")
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


def test_lying_layer_count_fails_before_building(folder):
    edit_config(folder, num_hidden_layers=10**9)  # building that many layers ran for minutes
    with pytest.raises(ModelLoadError, match=r"config gives 1000000000 layers but the checkpoint has 2 \(layers 0 to 1\)"):
        qianwen.load(folder, dtype="float32")


def test_integer_tensor_is_refused(folder):
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.int32)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"'model.layers.0.mlp.up_proj.weight' holds int32, not floating-point"):
        qianwen.load(folder, dtype="float32")


@pytest.mark.parametrize("weight_map", [["model.safetensors"], None, {"a": 1}, {"a": "../model.safetensors"}])
def test_bad_weight_map(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match="'weight_map' must map tensor names to .safetensors files"):
        qianwen.load(folder, dtype="float32")


def test_tokenizer_beyond_embedding_rows(folder):
    edit_config(folder, vocab_size=300)
    sd = load_file(folder / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name] = sd[name][:300].contiguous()
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"tokenizer has 384 tokens but the model's embedding has 300 rows"):
        qianwen.load(folder, dtype="float32")


def tiny_gguf(path, offsets_shift: int = 0, alignment: int | None = None):
    """A two-tensor GGUF written by the gguf package; `offsets_shift` moves the second tensor's data offset."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:  # declared only (the writer pads to 32 and refuses odd alignments)
        w.add_uint32("general.alignment", alignment)
    w.add_tensor("token_embd.weight", np.ones((8, 32), np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if offsets_shift:
        field = gguf.GGUFReader(path).tensors[1].field
        pos = field.offset + sum(p.nbytes for p in field.parts[:-1])  # the offset is the last part
        data = bytearray(path.read_bytes())
        old = int.from_bytes(data[pos:pos + 8], "little")
        data[pos:pos + 8] = (old + offsets_shift).to_bytes(8, "little")
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("shift, message", [(1, "data offset 1025 is not a multiple of the alignment 32"),
                                            (-32, "the data of tensors 'token_embd.weight' and 'output_norm.weight' overlap"),
                                            (1 << 40, "runs past the end of the file")])
def test_gguf_tensor_offsets_checked(tmp_path, shift, message):
    from qianwen.gguf_reader import GGUFFile

    with pytest.raises(ModelLoadError, match=message):
        GGUFFile(tiny_gguf(tmp_path / "t.gguf", shift))
    assert len(GGUFFile(tiny_gguf(tmp_path / "ok.gguf")).tensors) == 2


def test_gguf_alignment_must_be_a_power_of_two(tmp_path):
    from qianwen.gguf_reader import GGUFFile

    with pytest.raises(ModelLoadError, match=r"'general.alignment' is 48; expected a power of two"):
        GGUFFile(tiny_gguf(tmp_path / "t.gguf", alignment=48))
