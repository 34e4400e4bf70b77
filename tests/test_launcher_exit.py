"""How a preempted run ends under torchrun (2 CPU ranks, synthetic shards): what each rank exits
with, what torchrun exits with, what RUN/preempted.json says (preemption.py's docstring).

- USR2 to one rank (SLURM signals every task, not at the same instant): both ranks exit 75, none is
  SIGTERMed on its way out; torchrun exits 1 and lists both codes in its failure summary.
- USR2 in round 0's clustering, before any checkpoint: the message and the marker say so.
- USR2 to torchrun itself: plain torchrun dies of it and the ranks run on (orphans); with
  `--signals-to-handle ...,SIGUSR2` it forwards the signal, every rank exits 75, torchrun exits 1.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_cluster.runtime.logger import read_metrics
from dist_cluster.runtime.preemption import PREEMPTED_EXIT_CODE
from tests.processes import kill_tagged, new_token, tagged_env
from tests.shard_fixtures import make_shards

ROOT = Path(__file__).resolve().parents[1]
FORWARD_USR2 = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit_shards")
    make_shards(root, 8, 150, size=28)
    return root


class Torchrun:
    """tests/kill_point.py POINT under torchrun (no restarts); every process it starts is tagged and
    killed at the end, orphans included."""

    def __init__(self, run_dir: Path, shards: Path, point: str, *torchrun_args: str):
        self.token, self.run_dir = new_token(), run_dir
        env = tagged_env(self.token, OMP_NUM_THREADS="1")
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", *torchrun_args,
               "--nproc_per_node", "2", "tests/kill_point.py", point, "--config", "configs/smoke.yaml",
               f"run_dir={run_dir}", f"data.train={shards}", "dist.timeout_s=60", "train.ckpt_every_steps=0",
               "train.log_every_steps=1"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)

    def ranks(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return sorted(map(int, out.split()))

    def wait_for(self, stage: str, limit_s: float = 240) -> None:
        deadline = time.time() + limit_s
        while not read_metrics(self.run_dir, stage):
            assert self.proc.poll() is None and time.time() < deadline, f"no {stage} event"
            time.sleep(0.05)

    def finish(self, limit_s: float = 240) -> tuple[int, str]:
        try:
            output, _ = self.proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            kill_tagged(self.token)
            output, _ = self.proc.communicate()
            pytest.fail(f"torchrun still running after {limit_s} s\n{output[-5000:]}")
        finally:
            kill_tagged(self.token)
        return self.proc.returncode, output

    def rank_codes(self) -> list:
        return [json.loads((self.run_dir / f"exit.rank{r}.json").read_text())["code"] for r in (0, 1)]


def summary_codes(output: str) -> dict:
    """{rank: exit code} from torchrun's failure summary (`rank : r (local_rank: l)` then
    `exitcode : c (pid: p)` per failed rank; the `[i]:` labels there are list indices)."""
    pattern = r"\n\s+rank\s+:\s+(\d+) \(local_rank.*\n\s+exitcode\s+:\s+(-?\d+)"
    return {int(r): int(c) for r, c in re.findall(pattern, output)}


def marker(run_dir: Path) -> dict:
    return json.loads((run_dir / "preempted.json").read_text())


def test_usr2_to_one_rank_every_rank_exits_75(shards, tmp_path):
    run = Torchrun(tmp_path / "run", shards, "usr2-train")
    code, output = run.finish()
    assert code == 1, output[-5000:]  # torchrun: 1 whatever its ranks exited with
    assert summary_codes(output) == {0: PREEMPTED_EXIT_CODE, 1: PREEMPTED_EXIT_CODE}, output[-5000:]
    assert "SIGTERM" not in output.split("Failures:")[-1]
    assert run.rank_codes() == [PREEMPTED_EXIT_CODE] * 2
    (stop,) = read_metrics(run.run_dir, "preempted")
    held = run.run_dir / "checkpoints" / f"shared.step{stop['step']}.pt"
    assert f"preempted by SIGUSR2 at step {stop['step']}; {held} holds this step" in output
    assert marker(run.run_dir) | {"time": 0} == {"step": stop["step"], "signal": "SIGUSR2", "checkpoint": str(held),
                                                 "exit_code": 75, "world_size": 2, "time": 0}
    import torch
    last = run.run_dir / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["global_step"] == stop["step"] >= 4


def test_usr2_before_the_first_checkpoint_says_the_run_restarts(shards, tmp_path):
    run = Torchrun(tmp_path / "run", shards, "usr2-kmeans")
    code, output = run.finish()
    assert code == 1 and run.rank_codes() == [PREEMPTED_EXIT_CODE] * 2, output[-5000:]
    assert "preempted by SIGUSR2 at step 0; no checkpoint yet: the run restarts from the beginning" in output
    assert "holds this step" not in output
    assert not (run.run_dir / "checkpoints" / "last.pt").exists()
    (stop,) = read_metrics(run.run_dir, "preempted")
    assert stop["step"] == 0 and stop["phase"] == "cluster" and stop["checkpoint"] is None
    assert marker(run.run_dir)["checkpoint"] is None


@pytest.mark.slow  # torchrun's own behaviour, shown (20 s): nothing of ours can change it
def test_usr2_to_plain_torchrun_kills_it_and_orphans_the_ranks(shards, tmp_path):
    run = Torchrun(tmp_path / "run", shards, "none")
    run.wait_for("train")
    ranks = run.ranks()
    os.kill(run.proc.pid, signal.SIGUSR2)
    assert run.proc.wait(timeout=30) == -signal.SIGUSR2  # USR2's default action: torchrun is gone
    time.sleep(1)
    alive = [pid for pid in ranks if Path(f"/proc/{pid}").exists()]
    code, _ = run.finish()  # kills the orphans
    assert len(ranks) == 2 and alive == ranks, "the ranks outlive torchrun"
    assert not (run.run_dir / "preempted.json").exists()


def test_usr2_to_torchrun_that_forwards_it_stops_every_rank_with_75(shards, tmp_path):
    run = Torchrun(tmp_path / "run", shards, "none", FORWARD_USR2)
    run.wait_for("train")
    os.kill(run.proc.pid, signal.SIGUSR2)
    code, output = run.finish()
    assert code == 1, output[-5000:]
    assert run.rank_codes() == [PREEMPTED_EXIT_CODE] * 2, output[-5000:]
    assert "SIGKILL" not in output  # every rank was out before torchrun's --shutdown-timeout
    (stop,) = read_metrics(run.run_dir, "preempted")
    assert marker(run.run_dir)["step"] == stop["step"]
