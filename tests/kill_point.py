"""launch/train.py with one rank killed (SIGKILL, as `kill -9`) at a chosen point of the first
torchrun attempt; restarted attempts (TORCHELASTIC_RESTART_COUNT > 0) run untouched.

    torchrun --standalone --max-restarts 1 --nproc_per_node 2 tests/kill_point.py kmeans --config ...

Points (tests/test_restarts.py), each at a moment where the other rank is inside a collective or
about to enter one:
    extract   rank 0, after its 3rd extraction batch of round 0 (no checkpoint yet)
    kmeans    rank 1, before the 3rd level-1 M-step all_reduce of round 0 (no checkpoint yet)
    route     rank 0, before the all_to_all that routes round 1's features (last.pt: round 1 start)
    train     rank 1, after global step 12 (mid-epoch; last.pt at step 10)
    save      rank 0, after writing last.pt of step 15, before the barrier that ends the save
Before killing itself the rank writes RUN/killed.json (point, rank, time): the test measures the
restart from there. `none` runs unchanged (the reference).
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

KILLED_RANK = {"extract": 0, "kmeans": 1, "route": 0, "train": 1, "save": 0}


def _run_dir() -> Path:
    return Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("run_dir=")))


def die(point: str) -> None:
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
    from dist_cluster import checkpoint, comm, preemption, rounds
    calls = {"vote": 0, "route": 0, "extract": 0}
    if point == "extract":
        original_extract = rounds.extract_features

        def extract(trunk, loader, *args, **kwargs):
            calls["extract"] += 1
            return original_extract(trunk, _KillAfter(loader, 3) if calls["extract"] == 1 else loader,
                                    *args, **kwargs)
        rounds.extract_features = extract
    elif point == "kmeans":
        original_vote = preemption.UnevenLoopPoll.vote

        def vote():
            calls["vote"] += 1
            if calls["vote"] == 3:
                die("kmeans")
            return original_vote()
        preemption.UnevenLoopPoll.vote = staticmethod(vote)
    elif point == "route":
        original_route = comm.all_to_all_rows

        def route(*args, **kwargs):
            calls["route"] += 1
            if calls["route"] == 2:  # once per round: round 1
                die("route")
            return original_route(*args, **kwargs)
        comm.all_to_all_rows = route
    elif point == "train":
        original_hook = rounds.Run.maybe_checkpoint

        def hook(self, state, save=False):
            if not save and state["global_step"] == 12:
                die("train")
            return original_hook(self, state, save)
        rounds.Run.maybe_checkpoint = hook
    elif point == "save":
        original_save = checkpoint._atomic_save

        def atomic_save(obj, path):
            original_save(obj, path)
            if path.name == "last.pt" and obj["global_step"] == 15:
                die("save")
        checkpoint._atomic_save = atomic_save


def main() -> None:
    point = sys.argv.pop(1)
    if point != "none" and point not in KILLED_RANK:
        raise SystemExit(f"unknown kill point {point!r}: one of none, {', '.join(KILLED_RANK)}")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if point != "none" and first_attempt and int(os.environ["RANK"]) == KILLED_RANK[point]:
        install(point)
    sys.argv[0] = str(ROOT / "launch" / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
