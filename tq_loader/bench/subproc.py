"""Running a driver in another interpreter: a clean environment, ``@@bench`` events, a deadline.

The child's other output (Ray's and TransferQueue's logs) goes to a log file under the run's
output directory, so a failure can be read afterwards; the process is stopped by its pid if it
outlives its deadline.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["DRIVERS", "DriverError", "child_env", "events"]

DRIVERS = Path(__file__).resolve().parent / "drivers"
PREFIX = "@@bench "
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DEDUP_LOGS": "0"}


class DriverError(RuntimeError):
    """A driver process failed, timed out, or reported an error; the message names its log."""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without tq_loader's attach variables or a PYTHONPATH (the child must not
    reach tq_loader by accident), plus Ray's loopback/no-token settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_LOADER_") and k != "PYTHONPATH"}
    env.update(RAY_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _pump(stream: TextIO, lines: queue.Queue[str | None], log: TextIO) -> None:
    for line in stream:
        if line.startswith(PREFIX):
            lines.put(line[len(PREFIX) :])
        else:
            log.write(line)
            log.flush()
    lines.put(None)


def events(
    cmd: Sequence[str],
    log_path: Path,
    timeout_s: float,
    *,
    env: dict[str, str] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Start ``cmd`` and yield its ``@@bench`` events until it exits; raise :class:`DriverError` if
    it exits non-zero or runs past ``timeout_s`` (then it is killed)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or child_env()
        )
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines, log), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DriverError(f"{cmd[1]} ran past {timeout_s:.0f} s and was stopped; see {log_path}")
                try:
                    line = lines.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if line is None:
                    break
                event = json.loads(line)
                if event.get("event") == "status" and on_status:
                    on_status(event["text"])
                yield event
            rc = proc.wait(timeout=60)
            if rc != 0:
                raise DriverError(f"{Path(cmd[1]).name} exited with status {rc}; see {log_path}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            reader.join(timeout=10)
