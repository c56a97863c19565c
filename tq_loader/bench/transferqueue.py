"""TransferQueue 0.1.11 itself, in its own venv, driven through the same KV loop on the same batches.

The venv is ``.venv-tq/`` at the repository root (git-ignored; ``--tq-venv`` elsewhere). If its
python can already ``import transfer_queue`` it is used as it is -- ``make compat`` creates the
same venv, and the suite never deletes or re-creates it. Otherwise a full run installs it:
``torch==2.13.0`` first (the local CPU wheel; a bare requirement would pull a multi-GB CUDA
build), then ``TransferQueue==0.1.11``. ``--quick`` never installs. If it cannot be had, the
TransferQueue rows are skipped with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tq_loader.bench import subproc
from tq_loader.bench.registry import Context, System, register_system
from tq_loader.bench.results import KIND_PEER
from tq_loader.bench.workloads import Workload

__all__ = ["TQ_SYSTEM", "default_venv", "ensure_venv", "run_driver"]

TQ_VERSION = "0.1.11"
TORCH_PIN = "torch==2.13.0"
TQ_SYSTEM = f"TransferQueue {TQ_VERSION}"
_WAIT_S = 900.0  # how long to wait for another process's install into the same venv
_PROBE = "import transfer_queue, sys; sys.stdout.write(transfer_queue.__file__)"


def default_venv() -> Path:
    """``.venv-tq`` beside this checkout's pyproject.toml, else in the current directory."""
    root = Path(__file__).resolve().parents[2]
    return (root if (root / "pyproject.toml").is_file() else Path.cwd()) / ".venv-tq"


def _works(python: Path) -> bool:
    if not python.is_file():
        return False
    probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=300)
    return probe.returncode == 0


def _being_written(venv: Path, window_s: float = 120.0) -> bool:
    """Whether pip (of another process, e.g. ``make compat``) changed the venv in the last ``window_s``."""
    dirs = [venv, *venv.glob("lib/python*/site-packages")]
    return any(time.time() - d.stat().st_mtime < window_s for d in dirs if d.exists())


def ensure_venv(venv: Path, *, install: bool, log: Path, status: Any) -> tuple[Path | None, str]:
    """The venv's python if TransferQueue imports there (installing it first when allowed), else
    ``None`` and why not."""
    python = venv / "bin" / "python"
    if _works(python):
        return python, f"using {venv}"
    if python.is_file() and _being_written(venv):
        status(f"{TQ_SYSTEM}: another process is installing into {venv}; waiting for it")
        deadline = time.monotonic() + _WAIT_S
        while time.monotonic() < deadline and _being_written(venv):
            time.sleep(10)  # bounded wait on an observable condition: the venv stops changing
        if _works(python):
            return python, f"using {venv} (installed by another process meanwhile)"
    if not install:
        return (
            None,
            f"TransferQueue is not installed in {venv} and --quick does not install it (run `make bench`)",
        )
    steps: list[list[str]] = []
    if not python.is_file():
        steps.append([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "-q"]
    steps += [[*pip, TORCH_PIN], [*pip, f"TransferQueue=={TQ_VERSION}"]]
    with open(log, "a") as out:
        for step in steps:
            status(f"installing TransferQueue: {' '.join(step[-1:])}")
            out.write(f"$ {' '.join(step)}\n")
            out.flush()
            done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
            if done.returncode != 0:
                return (
                    None,
                    f"could not install TransferQueue into {venv} (`{' '.join(step)}` failed; see {log})",
                )
    if not _works(python):
        return None, f"TransferQueue was installed into {venv} but does not import; see {log}"
    return python, f"installed into {venv}"


def run_driver(
    ctx: Context, system: str, python: str | Path, workloads: list[Workload], label: str
) -> dict[str, dict[str, Any]]:
    """Run ``drivers/peer_driver.py`` for ``system`` ("transferqueue" | "ray") with ``python``; the
    results per workload. A workload the driver reports an error for becomes a skip."""
    spec = {
        "system": system,
        "reps": ctx.plan.reps,
        "rounds": ctx.plan.rounds,
        "workloads": [w.to_dict() for w in workloads],
    }
    spec_path = ctx.out / "logs" / f"{system}-spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [str(python), str(subproc.DRIVERS / "peer_driver.py"), str(spec_path)]
    sizes = sum(w.rows * max(1, w.regular + w.jagged + w.strings) for w in workloads)
    timeout = 300 + 3e-3 * sizes * ctx.plan.reps * ctx.plan.rounds  # generous: Ray start-up and slow rounds
    out: dict[str, dict[str, Any]] = {}
    for event in subproc.events(
        cmd, ctx.out / "logs" / f"{system}.log", timeout, on_status=lambda t: ctx.status(f"{label}: {t}")
    ):
        if event["event"] == "result":
            out[event["workload"]] = event["result"]
        elif event["event"] == "error":
            ctx.skip(event["workload"], label, f"the driver failed: {event['error']}")
        elif event["event"] == "tick":
            ctx.status(f"{label}: {event['workload']} round done")
    return out


def run_transferqueue(ctx: Context, workloads: list[Workload]) -> dict[str, dict[str, Any]]:
    if ctx.options.get("no_transferqueue"):
        for w in workloads:
            ctx.skip(w.name, TQ_SYSTEM, "switched off with --no-transferqueue")
        return {}
    venv = Path(ctx.options.get("tq_venv") or default_venv())
    ctx.status(f"{TQ_SYSTEM}: looking for {venv}")
    python, why = ensure_venv(
        venv,
        install=not ctx.plan.quick,
        log=ctx.out / "logs" / "transferqueue-install.log",
        status=ctx.status,
    )
    ctx.info["transferqueue_venv"] = why
    if python is None:
        for w in workloads:
            ctx.skip(w.name, TQ_SYSTEM, why)
        return {}
    try:
        return run_driver(ctx, "transferqueue", python, workloads, TQ_SYSTEM)
    except subproc.DriverError as exc:
        for w in workloads:
            ctx.skip(w.name, TQ_SYSTEM, str(exc))
        return {}


register_system(
    System(
        TQ_SYSTEM, KIND_PEER, run_transferqueue, note="2 SimpleStorage units as Ray actors, Ray num_cpus=16"
    )
)
