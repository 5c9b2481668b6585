"""torchrun with 2 CPU processes (gloo, FSDP2) follows the single-process loss curve; a checkpoint
saved by 2 processes resumes in 1."""

from __future__ import annotations

from tests.test_train_fixtures import losses, make_shards, pretrain_cmd, run


def test_two_processes_match_one_and_resume_across_world_sizes(tmp_path):
    tok, shards = make_shards(tmp_path)
    steps = ["--max-steps", "8", "--save-every", "4"]
    one = tmp_path / "one"
    run(pretrain_cmd(tok, shards, one, *steps))
    ref = losses(one)

    two = tmp_path / "two"
    p = run(pretrain_cmd(tok, shards, two, *steps, "--stop-at", "4", torchrun=2))
    assert "2 process(es)" in p.stdout
    got = losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got[s], ref[s])

    p = run(pretrain_cmd(tok, shards, two, *steps, "--resume"))  # one process picks up the 2-process checkpoint
    assert "saved by 2 processes" in p.stdout
    got = losses(two)
    assert sorted(got) == list(range(1, 9))
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got[s], ref[s])
    assert got[8] < got[1]
