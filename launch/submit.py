"""Submit training to SLURM through submitit: one task per GPU, requeued on preemption / time-out.

    python launch/submit.py --config configs/yfcc_vgg16.yaml --nodes 8 --gpus-per-node 8 \
        --partition learnfair --time 4320 run_dir=/checkpoint/$USER/yfcc
    python launch/submit.py --config configs/yfcc_vgg16.yaml --nodes 8 --gpus-per-node 8 --dry-run
    python launch/submit.py --config configs/fmnist.yaml --nodes 1 --gpus-per-node 2 \
        --sweep cluster.k=100,1000 --sweep train.lr=0.05,0.1 run_dir=runs/sweep    # 4-task job array
    python launch/submit.py --config configs/smoke.yaml --nodes 1 --gpus-per-node 2 --cluster local \
        run_dir=runs/local data.train=data/fmnist/smoke                                   # no SLURM

The job runs `dist_cluster.slurm.Trainer` (the code of launch/train.py, in-process). On USR2
(`--signal-delay-s` seconds before the end) it requeues itself and resumes from
RUN/checkpoints/last.pt. Without submitit, `srun python launch/train.py --config ...` works too
(dist_cluster/runtime/distributed.py reads SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST).
"""
import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_cluster.config import ConfigError, load_config  # noqa: E402
from dist_cluster.run import slurm  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file under configs/")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="also the number of tasks per node")
    parser.add_argument("--partition")
    parser.add_argument("--time", type=int, default=4320, help="time limit per job in minutes (default 72 h)")
    parser.add_argument("--cpus-per-task", type=int, help="default: data.num_workers + 2")
    parser.add_argument("--mem-gb", type=float, help="memory per node (default: the partition's)")
    parser.add_argument("--constraint")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--signal-delay-s", type=int, default=slurm.DEFAULT_SIGNAL_DELAY_S,
                        help="USR2 this many seconds before the time limit (sbatch --signal=USR2@S)")
    parser.add_argument("--max-timeouts", type=int, default=10,
                        help="requeues after a time-out before giving up (preemptions do not count)")
    parser.add_argument("--job-name", default="dist_cluster")
    parser.add_argument("--folder", help="submitit logs and pickles (default RUN_DIR/submitit/%%j)")
    parser.add_argument("--setup", action="append", default=[],
                        help="shell line run before srun, as written (repeatable; one line each)")
    parser.add_argument("--srun-arg", action="append", default=[],
                        help="extra srun argument, e.g. --srun-arg=--container-image=IMG (repeatable)")
    parser.add_argument("--python", help="python command of the job, words quoted one by one "
                                          "(default: this interpreter)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one array task per value (repeatable: cartesian product)")
    parser.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                        help="submitit executor: slurm (default; fails without srun), or local / debug "
                             "to run the job on this machine")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def train_command(args, overrides) -> str:
    """The equivalent plain-SLURM command, printed with --dry-run."""
    words = ["srun", f"--nodes={args.nodes}", f"--ntasks-per-node={args.gpus_per_node}",
             f"--gpus-per-node={args.gpus_per_node}", "python", "launch/train.py"]
    if args.config:
        words += ["--config", args.config]
    return shlex.join(words + list(overrides))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # a bad key fails here, not in the queue
        # run_dir becomes the log folder, which submitit writes into #SBATCH lines
        run_dir = Path(slurm.check_text("run_dir", cfg.run_dir)).absolute()
        folder = slurm.check_folder(args.folder or run_dir / "submitit" / "%j")
        if args.python:
            slurm.python_command(args.python)  # refused here rather than when the script is written
        points = slurm.sweep_points(args.sweep, str(run_dir)) if args.sweep else []
        for point in points:  # every array task's config must load, too
            load_config(args.config, [*args.overrides, *point])
        params = slurm.slurm_parameters(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, time_min=args.time,
            cpus_per_task=args.cpus_per_task or cfg.data.num_workers + 2, mem_gb=args.mem_gb,
            partition=args.partition, constraint=args.constraint, account=args.account, qos=args.qos,
            signal_delay_s=args.signal_delay_s, job_name=args.job_name, setup=args.setup,
            srun_args=args.srun_arg)
    except (ConfigError, ValueError) as err:
        sys.exit(f"error: {err}")
    # absolute paths: the job may start in another directory; run_dir pinned so a requeue finds it
    config = str(Path(args.config).absolute()) if args.config else None
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    trainer = slurm.Trainer(config, overrides)

    if args.dry_run:
        print(slurm.render_sbatch(folder, params, array_size=len(points) or None, python=args.python))
        print(f"# job: dist_cluster.slurm.Trainer({config!r}, {overrides!r})")
        for index, point in enumerate(points):
            print(f"#   array task {index}: {' '.join(point)}")
        print(f"# without submitit: {train_command(args, overrides)}")
        return 0
    try:
        executor = slurm.make_executor(folder, params, cluster=args.cluster,
                                       max_num_timeout=args.max_timeouts, python=args.python)
    except RuntimeError as err:
        sys.exit(f"error: {err}")
    if points:
        jobs = executor.map_array(trainer, points)
        print(f"submitted array {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks), logs in {folder}")
    else:
        job = executor.submit(trainer)
        print(f"submitted job {job.job_id}, run_dir {run_dir}, logs in {folder}")
    return 0


if __name__ == "__main__":
    main()
