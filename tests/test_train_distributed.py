"""torchrun with 2 CPU processes (gloo, FSDP2) follows the single-process loss curve, for pretraining
and for LoRA SFT; a checkpoint saved by 2 processes resumes in 1."""

from __future__ import annotations

from tests.test_train_fixtures import cli_cmd, losses, make_shards, pretrain_cmd, run, run_here


def test_two_processes_match_one_and_resume_across_world_sizes(tmp_path, capsys):
    tok, shards = make_shards(tmp_path)
    steps = ["--max-steps", "8", "--save-every", "4"]
    one = tmp_path / "one"
    run_here(pretrain_cmd(tok, shards, one, *steps))
    ref = losses(one)

    two = tmp_path / "two"
    p = run(pretrain_cmd(tok, shards, two, *steps, "--stop-at", "4", torchrun=2))
    assert "2 process(es)" in p.stdout
    got = losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got[s], ref[s])

    run_here(pretrain_cmd(tok, shards, two, *steps, "--resume"))  # one process picks up the 2-process checkpoint
    assert "saved by 2 processes" in capsys.readouterr().out
    got = losses(two)
    assert sorted(got) == list(range(1, 9))
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got[s], ref[s])
    assert got[8] < got[1]


def test_lora_sft_two_processes_match_one_and_checkpoint_holds_only_the_adapter(tmp_path):
    """LoRA SFT under FSDP2 (frozen base, trainable adapter, dropout on): 2 processes follow the
    1-process loss curve; the resumable checkpoint stores only the adapter and its optimizer state,
    and a 2-process checkpoint resumes in 1 process on the same curve."""
    import json

    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    from tests.test_train_fixtures import EN, ZH, make_base

    base = make_base(tmp_path)
    data = tmp_path / "sft.jsonl"
    recs = [{"instruction": EN[i % 5], "input": "", "output": ZH[(i * 3) % 5] + " " + EN[(i + 1) % 5]}
            for i in range(12)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))

    def args(out, *extra):
        return ["train", "sft", "-m", str(base), "-d", str(data), "-o", str(out), "--lora", "--lora-r", "8",
                "--max-steps", "4", "--save-every", "2", "--global-batch", "4", "--micro-batch", "2",
                "--seq-len", "128", "--no-packing", "--lr", "1e-2", "--dtype", "float32", "--no-progress", *extra]

    ref_dir = tmp_path / "one"
    run_here(cli_cmd(args(ref_dir)))
    ref = losses(ref_dir)
    assert sorted(ref) == list(range(1, 5)) and ref[4] < ref[1]

    two = tmp_path / "two"
    run(cli_cmd(args(two, "--stop-at", "2"), torchrun=2))
    got = losses(two)
    assert sorted(got) == [1, 2]
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got[s], ref[s])

    ckpt = two / "checkpoints" / "step-0000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world"] == 2 and state["trainable_only"] is True
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys[:5]
    assert len(model_keys) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in keys)

    run_here(cli_cmd(args(two, "--resume")))  # one process picks up the 2-process checkpoint
    got = losses(two)
    assert sorted(got) == list(range(1, 5))
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got[s], ref[s])
    a, b = load_file(str(ref_dir / "adapter" / "adapter_model.safetensors")), \
        load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
