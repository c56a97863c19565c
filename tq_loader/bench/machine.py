"""A description of the machine a run was measured on (kept with every result)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import tq_loader

__all__ = ["describe", "summary"]


def _first(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        return ""
    return ""


def _git_commit() -> str:
    root = Path(tq_loader.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return ""
    done = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def describe() -> dict[str, Any]:
    mem_kib = _first("/proc/meminfo", "MemTotal").split()
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    return {
        "when": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem_kib[0]) / 2**20, 1) if mem_kib else None,
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tq_loader": tq_loader.__version__,
        "commit": _git_commit(),
        "transparent_hugepages": thp,
        "load_average": os.getloadavg(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def summary(m: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.1f}" for x in m["load_average"])
    return (f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['os']} {m['arch']}, GPU {m['gpu']}, "
            f"Python {m['python']}, torch {m['torch']}, tq_loader {m['tq_loader']}"
            f"{' @ ' + m['commit'] if m['commit'] else ''}; load average at start {load}")  # fmt: skip
