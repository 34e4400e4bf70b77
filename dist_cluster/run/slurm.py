"""SLURM through submitit: requeueable jobs, the sbatch script they become, sweeps as job arrays.

    python launch/submit.py --config configs/yfcc_vgg16.yaml --nodes 8 --gpus-per-node 8 \
        --partition learnfair run_dir=/checkpoint/$USER/yfcc
    python launch/submit.py ... --dry-run        # print the sbatch script, submit nothing

One SLURM task per GPU (`--ntasks-per-node=G --gpus-per-node=G`); every task runs `Trainer()` in
its own process, which exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from submitit's
JobEnvironment and then goes through `distributed.session` like `torchrun` or `srun python
launch/train.py` would.

Preemption and time limits, as submitit 1.5.4 does them (read in its source):
- The sbatch line `--signal=USR2@<delay>` comes from `slurm_signal_delay_s` (default here 120 s):
  `slurm/slurm.py::_make_sbatch_string` writes `f"{JobEnvironment.USR_SIG}@{signal_delay_s}"`, and
  `core/job_environment.py` sets `USR_SIG = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")`
  (its comment: NCCL may catch USR1, the signal the original DeeperCluster code relied on).
- On USR2, task 0 calls the job's `checkpoint()`, pickles the DelayedSubmission it returns over
  the job's pickle, runs `scontrol requeue` and exits; the other tasks only log, and die with the
  job. A preemption does not count against `max_num_timeout`; a time-out does (submitit calls it
  a time-out when the job has run past min(80 %, limit - 10 min) of its time limit).
- We displace that handler (preemption.install, on every task): the signal is recorded, every
  rank saves the step it is in (the flag rides the per-step all_reduce), and only then task 0
  hands the signal to submitit's handler, which requeues. No step is redone.
- The requeued job builds `Trainer(config, overrides)` afresh: the trainer itself resumes from
  RUN/checkpoints/last.pt, so nothing but the constructor arguments travels through the pickle.

Script safety: every value that reaches the sbatch script is checked before it is written (see
check_script_params): no control characters anywhere, #SBATCH values are plain SLURM names, the
`--python` command is quoted word by word; `--setup` lines are the user's shell, kept as written.

`LocalExecutor` (tests): tasks get SUBMITIT_LOCAL_* variables and the controller restarts them
when a task exits with submitit's requeue code. Its `LocalJob._interrupt()` (no `timeout`
argument in 1.5.4, unlike `SlurmJob._interrupt(timeout=...)`) signals the controller process,
which has no USR2 handler; to simulate a preemption locally, signal the task process itself.
"""
from __future__ import annotations

import itertools
import os
import re
import shlex
import unicodedata
import zlib
from pathlib import Path
from typing import Mapping, MutableMapping, Optional, Sequence

import submitit
from submitit.helpers import DelayedSubmission

DEFAULT_SIGNAL_DELAY_S = 120  # USR2 this long before the kill: time to finish a step, save it, requeue


# ----------------------------------------------------------------------------- jobs


class ResumableJob:
    """A submitit job whose state lives on disk: `checkpoint()` resubmits a NEW instance built
    with the same constructor arguments, called with the same arguments, which resumes from disk.

    Subclasses implement `__call__`; the constructor arguments are captured by `__new__`, so a
    subclass needs no bookkeeping of its own. Nothing held in memory is pickled for the requeue.
    """

    def __new__(cls, *args, **kwargs):
        job = super().__new__(cls)
        job._init_args = (args, dict(kwargs))
        return job

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        init_args, init_kwargs = self._init_args
        return DelayedSubmission(type(self)(*init_args, **init_kwargs), *args, **kwargs)


class Trainer(ResumableJob):
    """`python launch/train.py --config CONFIG OVERRIDES... EXTRA...`, in-process, requeueable.

    `extra` holds per-array-task overrides (sweeps); the imports are lazy so that pickling and
    submitting need neither torch nor the training code.
    """

    def __init__(self, config: Optional[str], overrides: Sequence[str] = ()):
        self.config = config
        self.overrides = list(overrides)

    def __call__(self, extra: Sequence[str] = ()) -> str:
        export_dist_env()
        from dist_cluster.config import load_config, validate_against_data
        from dist_cluster.run.rounds import train
        cfg = load_config(self.config, [*self.overrides, *extra])
        validate_against_data(cfg)  # like launch/train.py: a bad data.train fails before any collective
        train(cfg, on_preempted=_requeue_on_task_zero)
        return str(cfg.run_dir)


def _requeue_on_task_zero(stop, submitit_handler) -> None:
    """Every rank's checkpoint is on disk: now let submitit's handler requeue (it calls
    `checkpoint()` and exits on task 0; on the other tasks it only logs)."""
    if callable(submitit_handler):
        submitit_handler(stop.signum, None)


# ----------------------------------------------------------------------------- ranks


def master_port(job_id: str) -> int:
    """The same port on every task of a job, without talking: 20000 + id % 20000, like
    distributed.detect_ranks does for SLURM_JOB_ID (ids that are not numbers are hashed)."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 20000 + number % 20000


def export_dist_env(environ: Optional[MutableMapping[str, str]] = None) -> tuple[int, int, int]:
    """Inside a submitit task: export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT so that
    distributed.init() takes its torchrun path, for SLURM and the local executor alike.

    Returns (rank, world_size, local_rank). Variables already set (a torchrun inside the job) win.
    Outside a submitit job it does nothing and returns the single-process answer.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if not env.get("SUBMITIT_EXECUTOR"):
        return 0, 1, 0
    job = submitit.JobEnvironment()
    # the local executor reports the machine's hostname, which may not resolve: use loopback
    master = job.hostnames[0] if job.cluster == "slurm" else "127.0.0.1"
    env.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank))
    env.setdefault("MASTER_ADDR", master)
    env.setdefault("MASTER_PORT", str(master_port(job.raw_job_id)))
    return job.global_rank, job.num_tasks, job.local_rank


# ----------------------------------------------------------------------------- executors


def slurm_parameters(nodes: int = 1, gpus_per_node: int = 0, tasks_per_node: Optional[int] = None,
                     time_min: int = 4320, cpus_per_task: Optional[int] = None,
                     mem_gb: Optional[float] = None, partition: Optional[str] = None,
                     constraint: Optional[str] = None, account: Optional[str] = None,
                     qos: Optional[str] = None, signal_delay_s: int = DEFAULT_SIGNAL_DELAY_S,
                     job_name: str = "dist_cluster", setup: Sequence[str] = (),
                     srun_args: Sequence[str] = (), array_parallelism: Optional[int] = None) -> dict:
    """AutoExecutor.update_parameters arguments: generic names plus `slurm_` ones.

    tasks_per_node defaults to one task per GPU (one per node without GPUs); mem_gb is per node.
    """
    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node must be >= 0, got {gpus_per_node}")
    if signal_delay_s < 1:
        raise ValueError(f"--signal-delay-s must be >= 1, got {signal_delay_s}")
    params = dict(name=job_name, nodes=nodes, tasks_per_node=tasks_per_node or max(gpus_per_node, 1),
                  timeout_min=int(time_min), slurm_signal_delay_s=int(signal_delay_s))
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if cpus_per_task:
        params["cpus_per_task"] = int(cpus_per_task)
    if mem_gb:
        params["mem_gb"] = mem_gb
    optional = dict(partition=partition, constraint=constraint, account=account, qos=qos,
                    array_parallelism=array_parallelism)
    params.update({f"slurm_{k}": v for k, v in optional.items() if v is not None})
    if setup:
        params["slurm_setup"] = list(setup)
    if srun_args:
        params["slurm_srun_args"] = list(srun_args)
    check_script_params(params)
    return params


def make_executor(folder: str | Path, params: Mapping, cluster: str = "slurm",
                  max_num_timeout: int = 3, python: Optional[str] = None) -> submitit.AutoExecutor:
    """An AutoExecutor for `cluster` ("slurm", or "local"/"debug" on this machine) with `params`.

    The cluster is never guessed: AutoExecutor's own guess falls back to running the job on this
    machine when `srun` is missing, which on a laptop would silently start the training.
    """
    check_script_params(params)
    kwargs = {"slurm_max_num_timeout": max_num_timeout}
    folder = check_folder(folder)
    if python:
        kwargs["slurm_python"] = python_command(python)
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, **kwargs)
    except RuntimeError as err:  # no srun: not on a SLURM login node
        raise RuntimeError(f"{err} Use --dry-run to see the sbatch script, or --cluster local to run "
                           f"the job on this machine.") from None
    if executor.cluster == "local":
        # the local executor knows neither SLURM-only names nor more than one node
        params = {k: v for k, v in params.items() if not k.startswith("slurm_") and k != "nodes"}
    executor.update_parameters(**params)
    return executor


class _ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor that can be built where `srun` is missing; used only to render scripts."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def render_sbatch(folder: str | Path, params: Mapping, array_size: Optional[int] = None,
                  python: Optional[str] = None) -> str:
    """The sbatch script submitit would submit for `params`, without submitting anything.

    Translates the generic names the way AutoExecutor does (`_convert_parameters`: timeout_min ->
    time, tasks_per_node -> ntasks_per_node, mem_gb -> mem, name -> job_name), lets the `slurm_`
    names win, then asks submitit's own `_make_submission_file_text`. `array_size` renders the
    `--array` line a `map_array` of that many calls gets.
    """
    check_script_params(params)
    executor = _ScriptOnlySlurmExecutor(check_folder(folder), python=python_command(python) if python else None)
    generic = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    native = executor._convert_parameters(generic)
    native.update({k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")})
    executor.update_parameters(**native)
    if array_size:
        executor.parameters["map_count"] = int(array_size)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ----------------------------------------------------------------------------- script safety
#
# What reaches the sbatch script submitit writes (slurm/slurm.py::_make_sbatch_string, 1.5.4):
#   `#SBATCH --key=value` lines  every slurm_* parameter and the generic ones it translates (name ->
#                                job-name, ...), plus --output/--error from the folder; values are
#                                shlex-quoted, but a newline still ends the comment and starts a command
#   setup lines                  written as they are, one script line each (--setup)
#   the srun line                srun args (quoted by submitit), the folder (quoted), and `python`
#                                (written as it is: we quote its words, python_command)
# Nothing else of ours gets there: the config and the overrides travel in the job's pickle.

# #SBATCH values must be plain SLURM names (letters, digits and these), so quoting never matters there
_NAME_CHARS = "_.,:=/+@%-"
# --constraint is a feature expression: `volta32gb&ib`, `[rack1|rack2]`, `gpu*2`, `!old`
_EXTRA_CHARS = {"slurm_constraint": _NAME_CHARS + "&|()[]*!"}
# the flag each parameter comes from, for the error message
_FLAGS = {"name": "--job-name", "slurm_partition": "--partition", "slurm_constraint": "--constraint",
          "slurm_account": "--account", "slurm_qos": "--qos", "slurm_setup": "--setup",
          "slurm_srun_args": "--srun-arg"}
# setup lines are shell by design (module load, source env); srun args are quoted by submitit: both
# may hold any printable text, but a newline would add a script line nobody asked for
_FREE_TEXT = {"slurm_setup", "slurm_srun_args"}


def check_text(field: str, value: str) -> str:
    """`value` unchanged, or ValueError naming `field` if it holds a control or line-break character."""
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string, got {type(value).__name__} {value!r}")
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise ValueError(f"{field} {value!r}: control character {bad!r} not allowed (it would reach "
                         f"the sbatch script, where a line break starts a new command)")
    return value


def _check_word(key: str, value) -> None:
    field = _FLAGS.get(key, key)
    check_text(field, value)
    allowed = _EXTRA_CHARS.get(key, _NAME_CHARS)
    if not re.fullmatch(f"[A-Za-z0-9{re.escape(allowed)}]+", value):
        raise ValueError(f"{field} {value!r}: only letters, digits and {allowed} are allowed "
                         f"(the value is written into an #SBATCH line)")


def check_script_params(params: Mapping) -> None:
    """ValueError naming the flag of any parameter that could add a command to the sbatch script.

    Numbers pass; strings must be SLURM names (_NAME_CHARS; --constraint: _EXTRA_CHARS); setup lines
    and srun args only must not hold control characters.
    """
    for key, value in params.items():
        if isinstance(value, (int, float)):  # bool too: a bare `#SBATCH --flag`
            continue
        if key in _FREE_TEXT:
            for item in value:
                check_text(_FLAGS[key], item)
        else:
            _check_word(key, value)


def check_folder(folder: str | Path) -> str:
    """The log folder as a string: submitit quotes it, so only control characters are refused."""
    return check_text("--folder", str(folder))


def python_command(python: str) -> str:
    """--python is a command (`singularity exec img.sif python`) that submitit writes unquoted:
    split it into words and quote each, so `;`, `$(...)` or backticks stay literal arguments."""
    check_text("--python", python)
    try:
        words = shlex.split(python)
    except ValueError as err:
        raise ValueError(f"--python {python!r}: {err}") from None
    if not words:
        raise ValueError("--python is empty")
    return shlex.join(words)


# ----------------------------------------------------------------------------- sweeps

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_.=-]")


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """'cluster.k=1000,10000' -> ('cluster.k', ['1000', '10000'])."""
    key, sep, values = spec.partition("=")
    items = [v.strip() for v in values.split(",")] if sep else []
    if not key or not items or any(not v for v in items):
        raise ValueError(f"--sweep {spec!r} must be key=v1,v2,... with non-empty values")
    return key.strip(), items


def sweep_points(specs: Sequence[str], base_run_dir: str) -> list[list[str]]:
    """Overrides of every array task: the cartesian product of the sweeps, each task with its own
    run_dir `BASE/<key>=<value>[,<key>=<value>...]` unless the sweep sets run_dir itself."""
    parsed = [parse_sweep(s) for s in specs]
    keys = [k for k, _ in parsed]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--sweep names a key twice: {keys}")
    points = []
    for values in itertools.product(*(v for _, v in parsed)):
        overrides = [f"{k}={v}" for k, v in zip(keys, values)]
        if "run_dir" not in keys:
            slug = ",".join(_SLUG_UNSAFE.sub("_", o) for o in overrides)
            overrides.append(f"run_dir={Path(base_run_dir) / slug}")
        points.append(overrides)
    return points
