"""kill -9 in the middle of a run, resume: every later step's loss equals the uninterrupted run's."""

from __future__ import annotations

import signal
import subprocess
import time

from tests.test_train_fixtures import cli_env, losses, make_shards, pretrain_cmd, run_here


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    tok, shards = make_shards(tmp_path)
    steps = ["--max-steps", "20", "--save-every", "5", "--keep", "2"]
    ref = tmp_path / "ref"
    run_here(pretrain_cmd(tok, shards, ref, *steps))
    full = losses(ref)
    assert len(full) == 20

    out = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(tok, shards, out, *steps), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-0000010").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = losses(out)
    assert 10 <= max(before) < 20  # really killed in the middle

    run_here(pretrain_cmd(tok, shards, out, *steps, "--resume"))
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(1, 21):
        assert resumed[step] == full[step], (step, resumed[step], full[step])  # bitwise (fp32, CPU)
    assert resumed[20] < resumed[1]
