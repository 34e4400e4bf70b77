"""A benchmark's JSON: its numbers beside the machine, the commit and the load they were measured under.

    from bench.record import write_record
    write_record(args.out, {"rows": rows, "settings": vars(args)})
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """HEAD of the checkout the bench ran from ("" outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    """When, where and under what load: numbers from a shared 2-core machine mean little without it."""
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:  # a bench that never needed torch
        torch_version = None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
            "commit": commit(), "load_average": os.getloadavg(), "torch": torch_version}


def write_record(path, doc: dict) -> dict:
    """doc + machine(), written as JSON to path (folders made); returns what was written."""
    full = {**doc, **machine()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(full, indent=1, default=str))
    print(f"wrote {path}")
    return full
