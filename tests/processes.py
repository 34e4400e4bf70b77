"""Process trees tagged by an environment variable: start a command, find and kill all it started.

    token = new_token()
    proc = subprocess.Popen(cmd, env=tagged_env(token))   # torchrun, its ranks, their loader workers
    kill_tagged(token)                                    # every one of them, orphans included
    assert not alive_tagged(token)

Why a tag and not a process group or session: torchrun starts each worker in a session of its own
(torch/distributed/elastic/.../subprocess_handler.py: start_new_session=True), so `killpg` on the
agent leaves the ranks running, and a rank whose agent died is re-parented away from us. Every
descendant inherits the environment, whatever session it is in, so /proc/<pid>/environ finds them
all. Used by the tests (test_restarts, test_launcher_exit) and by scripts/gpu_check.py.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

TAG = "DIST_CLUSTER_TEST_TOKEN"


def new_token() -> str:
    return uuid.uuid4().hex


def tagged_env(token: str, base: dict | None = None, **extra: str) -> dict:
    """The environment of a tagged command: `base` (default os.environ) plus the tag and `extra`."""
    return {**(os.environ if base is None else base), **extra, TAG: token}


def _state(pid: str) -> str:
    """The process state letter (R, S, Z, ...) from /proc/<pid>/stat; '' if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:][:1]  # the name in parentheses may hold spaces


def alive_tagged(token: str) -> list[int]:
    """Pids of the live (not zombie) processes carrying the tag, this process excluded."""
    marker, pids = f"{TAG}={token}".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ.split(b"\0") and _state(entry.name) not in ("", "Z"):
            pids.append(int(entry.name))
    return pids


def kill_tagged(token: str, wait_s: float = 10.0) -> list[int]:
    """SIGKILL every tagged process until none is left (a parent may fork between two scans);
    returns the pids killed. Raises if some survive `wait_s` seconds (a process in D state)."""
    killed: list[int] = []
    deadline = time.monotonic() + wait_s
    while True:
        pids = alive_tagged(token)
        if not pids:
            return sorted(set(killed))
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes tagged {token} still alive after SIGKILL: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
