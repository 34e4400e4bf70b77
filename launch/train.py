"""Train DeeperCluster: extract -> cluster -> train, round after round, on every rank in lockstep.

    torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/fmnist.yaml run_dir=runs/fmnist
    torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/smoke.yaml run_dir=RUN data.train=SHARDS
    srun python launch/train.py --config configs/yfcc_vgg16.yaml run_dir=/checkpoint/$USER/dc   # SLURM
    python launch/train.py --config configs/fmnist.yaml --export-init run_dir=runs/random     # random init

Any config key can be overridden as key=value (see dist_cluster/config.py); unknown keys, bad values
and a data.train that cannot hold the run (missing shards, k above its image count) fail before any
work. Running the same command again resumes from RUN/checkpoints/last.pt; a resume may change only
the keys of dist_cluster/config.py RESUMABLE_KEYS (train.epochs to extend a run, ...), others fail.
On USR2 (SLURM's `--signal=USR2@<delay>`, sent to every rank) the ranks save the step they are in,
rank 0 writes RUN/preempted.json, and every rank exits with code 75. `srun` (one task per GPU) then
exits 75; torchrun exits 1 for a preemption and a crash alike: read RUN/preempted.json
(`[ -e RUN/preempted.json ] && exit 75`). Signal the ranks, not torchrun: a USR2 to torchrun kills
it and orphans the ranks unless it runs with `--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2`.
`torchrun --max-restarts N` restarts the ranks after one dies (they resume from last.pt) and after a
preemption too: use --max-restarts 0 under a wrapper that requeues.
--export-init writes the untrained trunk (RUN/export/, RUN/config.yaml) and exits: the random-init
baseline of bench/quality.py, evaluated like any run (launch/eval.py --run RUN).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_cluster.config import ConfigError, load_config, validate_against_data  # noqa: E402


def export_initial_backbone(cfg) -> Path:
    """RUN/export/<arch>_backbone.pth of the trunk a run starts from, plus RUN/config.yaml (evaluation
    reads the image size there): models.initial_trunk, as rounds.Run builds it; nothing is trained
    and no data is read."""
    from dist_cluster.config import save_config
    from dist_cluster.models import initial_trunk
    from dist_cluster.models.export import export_backbone
    trunk = initial_trunk(cfg.model, cfg.data.image_size, cfg.seed)
    save_config(cfg, cfg.run_dir)
    return export_backbone(trunk, cfg.model.arch, Path(cfg.run_dir) / "export")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file under configs/")
    parser.add_argument("--export-init", action="store_true",
                        help="export the untrained trunk to RUN/export/ and exit (random-init baseline)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not args.export_init:
            validate_against_data(cfg)  # before torch.distributed: a bad run fails on every rank at once
    except ConfigError as err:
        parser.error(str(err))
    if args.export_init:
        print(f"exported the initial backbone to {export_initial_backbone(cfg)}")
        return
    from dist_cluster.checkpoint.store import CheckpointError
    from dist_cluster.run.rounds import (
        check_resume,  # after the config is known good: torch imports take seconds
        train,
    )
    try:
        check_resume(cfg)  # a run_dir of another configuration: the keys, before any work (train() checks too)
    except (ConfigError, CheckpointError) as err:
        parser.error(str(err))
    train(cfg)


if __name__ == "__main__":
    main()
