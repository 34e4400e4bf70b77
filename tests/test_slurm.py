"""SLURM submission: the sbatch script submitit would submit, sweeps, rank export, and requeue.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_slurm.py

Requeue is exercised for real with submitit's LocalExecutor: the task process gets USR2 (what SLURM
sends `--signal-delay-s` before the end), submitit calls the job's checkpoint(), the controller
restarts the task, and the new instance resumes from what the first one left on disk.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import submitit

from dist_cluster.config import load_config
from dist_cluster.run import slurm
from dist_cluster.runtime.distributed import detect_ranks
from tests.ci import skip_unless_ci

REPO = Path(__file__).resolve().parent.parent
SUBMIT = REPO / "launch" / "submit.py"


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class StepJob(slurm.ResumableJob):
    """`total` steps of `step_s` seconds; the list of completed steps is saved after each one."""

    def __init__(self, run_dir: str, total: int, step_s: float):
        self.run_dir, self.total, self.step_s = run_dir, total, step_s

    def __call__(self) -> dict:
        run = Path(self.run_dir)
        state_path = run / "progress.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {"completed": [], "starts": []}
        state["starts"].append(len(state["completed"]))
        _atomic_json(state_path, state)
        _atomic_json(run / "pid.json", os.getpid())
        for step in range(len(state["completed"]), self.total):
            time.sleep(self.step_s)
            state["completed"].append(step)
            _atomic_json(state_path, state)
        return state


class DistProbeJob:
    """One all_reduce over the tasks of a local submitit job, through export_dist_env + distributed."""

    def __call__(self):
        import torch
        torch.set_num_threads(1)
        import torch.distributed as dist

        from dist_cluster.runtime import distributed
        exported = slurm.export_dist_env()
        env = distributed.init(backend="gloo", timeout_s=60, device="cpu")
        total = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(total)
        distributed.shutdown()
        return exported, (env.rank, env.world_size, env.local_rank), total.item()


@pytest.fixture
def importable_tests(monkeypatch):
    """Task processes unpickle the job classes above by module name: make this module importable
    whichever name pytest gave it (`test_slurm` or `tests.test_slurm`)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests")]))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def finished(job, timeout: float):
    """job.result() with a deadline: a stuck local job is cancelled instead of hanging the test."""
    try:
        wait_for(job.done, timeout, f"job {job.job_id} to finish")
    except AssertionError:
        job.cancel()
        raise AssertionError(f"job did not finish in {timeout} s; stderr:\n{job.stderr()}") from None
    return job


# --------------------------------------------------------------------------- sbatch script


def test_dry_run_prints_the_sbatch_script(tmp_path, capsys):
    from launch.submit import main  # noqa: WPS433 - the CLI under test
    run_dir = tmp_path / "run"
    rc = main(["--config", "configs/smoke.yaml", "--nodes", "2", "--gpus-per-node", "4", "--partition", "dev",
               "--signal-delay-s", "90", "--time", "600", "--account", "proj", "--dry-run", f"run_dir={run_dir}"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = set(out.splitlines())
    cpus = load_config("configs/smoke.yaml").data.num_workers + 2  # loader workers + main + spare
    for expected in ("#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --nodes=2",
                     "#SBATCH --signal=USR2@90", "#SBATCH --partition=dev", "#SBATCH --time=600",
                     "#SBATCH --account=proj", f"#SBATCH --cpus-per-task={cpus}"):
        assert expected in lines, f"{expected!r} not in:\n{out}"
    assert "-m submitit.core._submit" in out and "srun" in out
    assert f"launch/train.py --config configs/smoke.yaml run_dir={run_dir}" in out
    assert not run_dir.exists(), "a dry run must not create anything"


def test_dry_run_sweep_is_one_array(tmp_path, capsys):
    from launch.submit import main
    rc = main(["--config", "configs/smoke.yaml", "--nodes", "1", "--gpus-per-node", "2", "--dry-run",
               "--sweep", "cluster.k=16,32,64", "--sweep", "train.lr=0.1,0.2", f"run_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "#SBATCH --array=0-5%6" in out.splitlines()
    assert f"array task 5: cluster.k=64 train.lr=0.2 run_dir={tmp_path}/cluster.k=64,train.lr=0.2" in out


def test_bad_override_fails_before_submitting(tmp_path):
    from launch.submit import main
    with pytest.raises(SystemExit, match="cluster.nope"):
        main(["--config", "configs/smoke.yaml", "--dry-run", "cluster.nope=1"])
    with pytest.raises(SystemExit, match="must be a multiple"):  # a sweep point that cannot load
        main(["--config", "configs/smoke.yaml", "--dry-run", "--sweep", "cluster.k=16,17"])


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine has SLURM")
def test_no_silent_local_fallback(tmp_path):
    """Without srun, submitting is an error, never a training started on this machine."""
    with pytest.raises(RuntimeError, match="--dry-run"):
        slurm.make_executor(tmp_path / "submitit", slurm.slurm_parameters(gpus_per_node=2))


def test_sweep_points_are_the_cartesian_product():
    points = slurm.sweep_points(["a.b=1,2", "c=x"], "/runs/base")
    assert points == [["a.b=1", "c=x", "run_dir=/runs/base/a.b=1,c=x"],
                      ["a.b=2", "c=x", "run_dir=/runs/base/a.b=2,c=x"]]
    assert slurm.sweep_points(["run_dir=/r/1,/r/2"], "/base") == [["run_dir=/r/1"], ["run_dir=/r/2"]]
    for bad in ("k", "k=", "k=1,,2", "=1"):
        with pytest.raises(ValueError):
            slurm.parse_sweep(bad)


# --------------------------------------------------------------------------- ranks


def test_export_dist_env_agrees_with_srun_detection(monkeypatch):
    """A submitit task and a plain `srun python launch/train.py` task see the same rank and master."""
    slurm_vars = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                  "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[012-015]"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**slurm_vars, "SUBMITIT_EXECUTOR": "slurm"}.items():
        monkeypatch.setenv(name, value)
    environ = dict(os.environ)
    assert slurm.export_dist_env(environ) == (5, 16, 1)
    srun_env = dict(slurm_vars)
    assert detect_ranks(srun_env) == (5, 16, 1)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == (srun_env["MASTER_ADDR"], srun_env["MASTER_PORT"])
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("gpu012", str(20000 + 4242))
    assert detect_ranks(environ) == (5, 16, 1)  # now through the torchrun variables


def test_export_dist_env_outside_a_job_is_a_no_op():
    environ = {"PATH": "/bin"}
    assert slurm.export_dist_env(environ) == (0, 1, 0) and environ == {"PATH": "/bin"}
    assert slurm.master_port("123_4") == slurm.master_port("123_4") and 20000 <= slurm.master_port("x") < 40000


def test_two_local_tasks_form_one_gloo_group(tmp_path, importable_tests):
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"))
    executor.update_parameters(tasks_per_node=2, timeout_min=2)
    job = finished(executor.submit(DistProbeJob()), timeout=60)
    results = job.results()
    assert [r[0] for r in results] == [(0, 2, 0), (1, 2, 1)]  # exported
    assert [r[1] for r in results] == [(0, 2, 0), (1, 2, 1)]  # what distributed.init saw
    assert [r[2] for r in results] == [float(sum(range(1, 3)))] * 2


# --------------------------------------------------------------------------- requeue


def test_preempted_job_requeues_and_resumes(tmp_path, importable_tests):
    run = tmp_path / "run"
    run.mkdir()
    total = 10
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"), max_num_timeout=3)
    executor.update_parameters(timeout_min=2)
    job = executor.submit(StepJob(str(run), total, 0.2))

    def progress() -> dict:
        try:
            return json.loads((run / "progress.json").read_text())
        except (OSError, ValueError):
            return {}
    wait_for(lambda: len(progress().get("completed", [])) >= 3, 30, "3 steps")
    first_pid = json.loads((run / "pid.json").read_text())
    os.kill(first_pid, signal.SIGUSR2)  # what SLURM sends at --signal=USR2@<delay>
    result = finished(job, timeout=40).result()

    assert result["completed"] == list(range(total)), "every step done exactly once"
    assert len(result["starts"]) == 2 and result["starts"][0] == 0
    assert 3 <= result["starts"][1] < total, "the second start resumed from the first one's progress"
    assert json.loads((run / "pid.json").read_text()) != first_pid, "a new process ran the rest"
    assert "Requeued job" in (job.stderr() or "") + (job.stdout() or "")


def test_checkpoint_resubmits_a_fresh_instance_with_the_same_arguments():
    job = StepJob("/r", 5, step_s=0.5)
    job.completed_in_memory = [1, 2]  # state held in memory must not travel
    delayed = job.checkpoint()
    assert isinstance(delayed.function, StepJob) and delayed.function is not job
    assert vars(delayed.function) == {"_init_args": (("/r", 5), {"step_s": 0.5}), "run_dir": "/r",
                                      "total": 5, "step_s": 0.5}
    trainer = slurm.Trainer("cfg.yaml", ["run_dir=/r"])
    again = trainer.checkpoint(["cluster.k=10"])
    assert (again.function.config, again.function.overrides, again.args) == \
        ("cfg.yaml", ["run_dir=/r"], (["cluster.k=10"],))


def test_trainer_preempted_mid_epoch_saves_requeues_and_finishes(tmp_path, importable_tests):
    """The real Trainer on 2 local tasks, USR2 mid-epoch with no periodic checkpoint: every rank
    saves the step it is in, task 0 requeues, the new job resumes at that step and finishes."""
    from dist_cluster.runtime.logger import read_metrics
    from shards.build import main as build_main
    shards = tmp_path / "shards"
    assert build_main(["fmnist", "--split", "train", "--limit", "640", "--shard-size", "160",
                       "--out", str(shards)]) == 0
    run = tmp_path / "run"
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"), max_num_timeout=3)
    executor.update_parameters(tasks_per_node=2, timeout_min=10)
    job = executor.submit(slurm.Trainer(str(REPO / "configs" / "smoke.yaml"),
                                        [f"run_dir={run}", f"data.train={shards}", "data.num_workers=0",
                                         "train.ckpt_every_steps=0", "train.log_every_steps=1"]))

    def second_epoch_started():
        if job.done():  # failed before it got there: show why instead of waiting
            raise AssertionError(f"job ended early:\n{job.stderr()}")
        return any(e["epoch"] == 1 for e in read_metrics(run, "train"))
    wait_for(second_epoch_started, 300, "the second epoch")
    for pid in _children(job._process.pid):  # SLURM signals every task; rank 0 requeues
        os.kill(pid, signal.SIGUSR2)
    finished(job, timeout=400)
    assert job.results() == [str(run)] * 2
    logs = (job.stderr() or "") + (job.stdout() or "")
    assert "Requeued job" in logs and "resumed from" in logs
    (stop,) = read_metrics(run, "preempted")
    (resumed,) = read_metrics(run, "resume")
    assert resumed["step"] == stop["step"] and stop["epoch"] == 1
    steps = [e["step"] for e in read_metrics(run, "train")]
    assert steps == sorted(set(steps)), "a step was done twice"
    assert len(read_metrics(run, "done")) == 1
    assert [e["round"] for e in read_metrics(run, "extract")] == [0, 1]  # no round clustered twice


def _children(pid: int) -> list[int]:
    """Task processes of a local submitit controller (Linux /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    if sys.platform != "linux" or not kids:
        skip_unless_ci("cannot list the task processes")
    return sorted(kids)
