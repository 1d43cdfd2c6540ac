"""The JSON record every benchmark writes: where and from what code it ran, then its own fields."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import torch


def git_commit() -> str:
    """The code's commit: SVDQ_COMMIT where set (a copy of the tree whose .git is stale), else git's."""
    if os.environ.get("SVDQ_COMMIT"):
        return os.environ["SVDQ_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_fields() -> dict:
    """The GPU (name, SM count) where there is one, else the CPU."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"device": props.name, "sm_count": props.multi_processor_count}
    return {"device": f"CPU ({platform.processor() or platform.machine()})"}


def write_result(path: str, **fields) -> None:
    """Writes `fields` to `path` after the device, date, commit and software versions."""
    result = {
        **device_fields(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **fields,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")
