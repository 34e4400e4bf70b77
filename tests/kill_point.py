"""launch/train.py with one rank killed (SIGKILL, as `kill -9`) or sent USR2 at a chosen point of
the first torchrun attempt; restarted attempts (TORCHELASTIC_RESTART_COUNT > 0) run untouched.
Every rank records the code it exits with in RUN/exit.rank<r>.json (torchrun does not print them
when it stops on a signal of its own).

    torchrun --standalone --max-restarts 1 --nproc_per_node 2 tests/kill_point.py kmeans --config ...

Points (tests/test_restarts.py), each at a moment where the other rank is inside a collective or
about to enter one:
    extract   rank 0, after its 3rd extraction batch of round 0 (no checkpoint yet)
    kmeans    rank 1, before the 3rd level-1 M-step all_reduce of round 0 (no checkpoint yet)
    route     rank 0, before the all_to_alls that route round 1's features (last.pt: round 1 start)
    train     rank 1, after global step 12 (mid-epoch; step 10 written, published at the next save)
    save      rank 0, once last.pt points at step 15's shared file (its publication, at the next
              save), before the barrier that ends it (the other rank waits there; old rank files
              not yet pruned)
Before killing itself the rank writes RUN/killed.json (point, rank, time): the test measures the
restart from there. `none` runs unchanged (the reference).
    pause-train  every rank, at global step DIST_CLUSTER_PAUSE_STEP (default 13): writes
              RUN/paused.rank<r>.json and sleeps, for a kill from outside (scripts/gpu_check.py kills
              the whole tree, as a node failure would)
USR2 (tests/test_launcher_exit.py), sent by rank 1 to itself, as SLURM would:
    usr2-kmeans  before the 2nd level-1 M-step of round 0 (no checkpoint yet)
    usr2-train   after global step 4
"""
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the rank the point is installed on; None: every rank
KILLED_RANK = {"extract": 0, "kmeans": 1, "route": 0, "train": 1, "save": 0, "usr2-kmeans": 1, "usr2-train": 1,
               "pause-train": None}


def _run_dir() -> Path:
    return Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("run_dir=")))


def die(point: str) -> None:
    if point.startswith("usr2-"):
        os.kill(os.getpid(), signal.SIGUSR2)
        return
    (_run_dir() / "killed.json").write_text(json.dumps(
        {"point": point, "rank": int(os.environ["RANK"]), "time": time.time()}))
    os.kill(os.getpid(), signal.SIGKILL)


class _KillAfter:
    """The extraction loader, killing this rank after `n` batches."""

    def __init__(self, loader, n):
        self._loader, self._n = loader, n

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        for i, batch in enumerate(self._loader):
            if i == self._n:
                die("extract")
            yield batch


def install(point: str) -> None:
    from dist_cluster.checkpoint import store
    from dist_cluster.run import rounds
    from dist_cluster.runtime import preemption
    calls = {"vote": 0, "route": 0, "extract": 0}
    if point == "extract":
        original_extract = rounds.extract_features

        def extract(trunk, loader, *args, **kwargs):
            calls["extract"] += 1
            return original_extract(trunk, _KillAfter(loader, 3) if calls["extract"] == 1 else loader,
                                    *args, **kwargs)
        rounds.extract_features = extract
    elif point in ("kmeans", "usr2-kmeans"):
        original_vote = preemption.UnevenLoopPoll.vote

        def vote():
            calls["vote"] += 1
            if calls["vote"] == (3 if point == "kmeans" else 2):
                die(point)
            return original_vote()
        preemption.UnevenLoopPoll.vote = staticmethod(vote)
    elif point == "route":
        from dist_cluster.cluster.route import RoutePlan
        original_send = RoutePlan.send_rows

        def send_rows(self, *args, **kwargs):
            calls["route"] += 1
            if calls["route"] == 2:  # once per round: round 1
                die("route")
            return original_send(self, *args, **kwargs)
        RoutePlan.send_rows = send_rows
    elif point in ("train", "usr2-train"):
        original_hook = rounds.Run.maybe_checkpoint
        at_step = 12 if point == "train" else 4

        def hook(self, state, save=False):
            if not save and state["global_step"] == at_step:
                self.writer.join()  # step 10's background write done: the restart resumes there
                die(point)
            return original_hook(self, state, save)
        rounds.Run.maybe_checkpoint = hook
    elif point == "pause-train":
        original_hook = rounds.Run.maybe_checkpoint
        at_step = int(os.environ.get("DIST_CLUSTER_PAUSE_STEP", "13"))

        def hook(self, state, save=False):
            if not save and state["global_step"] == at_step:
                (_run_dir() / f"paused.rank{os.environ['RANK']}.json").write_text(json.dumps(
                    {"step": at_step, "time": time.time()}))
                while True:  # until killed from outside
                    time.sleep(3600)
            return original_hook(self, state, save)
        rounds.Run.maybe_checkpoint = hook
    elif point == "save":
        original_point = store._point_last

        def point_last(path, digest, round_copy):
            original_point(path, digest, round_copy)
            if path.name == store.shared_file("", 15).name:
                die("save")
        store._point_last = point_last

def main() -> None:
    point = sys.argv.pop(1)
    if point != "none" and point not in KILLED_RANK:
        raise SystemExit(f"unknown kill point {point!r}: one of none, {', '.join(KILLED_RANK)}")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if point != "none" and first_attempt and KILLED_RANK[point] in (None, int(os.environ["RANK"])):
        install(point)
    sys.argv[0] = str(ROOT / "launch" / "train.py")
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code
        raise
    except BaseException:
        code = 1  # what the interpreter exits with on an uncaught exception
        raise
    finally:
        _run_dir().mkdir(parents=True, exist_ok=True)
        (_run_dir() / f"exit.rank{os.environ['RANK']}.json").write_text(json.dumps({"code": code}))


if __name__ == "__main__":
    main()
