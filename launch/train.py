"""Train DeeperCluster: extract -> cluster -> train, round after round, on every rank in lockstep.

    torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/fmnist.yaml run_dir=runs/fmnist
    torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/smoke.yaml run_dir=RUN data.train=SHARDS
    srun python launch/train.py --config configs/yfcc_vgg16.yaml run_dir=/checkpoint/$USER/dc   # SLURM

Any config key can be overridden as key=value (see dist_cluster/config.py); unknown keys fail before
any work. Running the same command again resumes from RUN/checkpoints/last.pt.
On USR2 (SLURM's `--signal=USR2@<delay>`, sent to every rank) the ranks save the step they are in
and exit with code 75; under SLURM use one task per GPU (`srun`), not torchrun, which USR2 kills.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_cluster.config import ConfigError, load_config  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    from dist_cluster.rounds import train  # after the config is known good: torch imports take seconds
    train(cfg)


if __name__ == "__main__":
    main()
