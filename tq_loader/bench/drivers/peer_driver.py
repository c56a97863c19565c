"""Drive TransferQueue 0.1.11 or Ray's object store through the suite's KV loop, in this interpreter.

Run by path (``python peer_driver.py SPEC.json``) -- for TransferQueue with the python of its own
venv, where tq_loader is not installed and must not be imported. It loads ``../workloads.py`` by
path, so the TensorDicts (same seed) and the calls are exactly those tq_loader is measured with.

SPEC: ``{"system": "transferqueue" | "ray", "reps": R, "rounds": K, "workloads": [Workload, ...]}``.
Ray is started here, on loopback, without a dashboard: ``num_cpus=16`` because TransferQueue's
actors ask for whole CPUs and would stay pending on a 2-core machine. Results: ``@@bench`` lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def emit(event: str, **data: Any) -> None:
    print("@@bench " + json.dumps({"event": event, **data}), flush=True)


def load_workloads() -> Any:
    path = Path(__file__).resolve().parents[1] / "workloads.py"
    spec = importlib.util.spec_from_file_location("bench_workloads", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_workloads"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


class RayStore:
    """The KV calls of the loop as Ray object-store operations: put = ``ray.put`` of the whole
    TensorDict, get = ``ray.get`` of its reference, clear = dropping the reference."""

    def __init__(self, ray: Any) -> None:
        self._ray = ray
        self._refs: dict[str, Any] = {}

    def kv_batch_put(self, keys: list[str], partition_id: str, fields: Any) -> None:
        self._refs[partition_id] = self._ray.put(fields)

    def kv_batch_get(self, keys: list[str], partition_id: str) -> Any:
        return self._ray.get(self._refs[partition_id])

    def kv_clear(self, keys: list[str], partition_id: str) -> None:
        self._refs.pop(partition_id, None)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    wl = load_workloads()
    import ray

    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    emit("status", text=f"Ray {ray.__version__} started")
    try:
        if spec["system"] == "transferqueue":
            import transfer_queue as api

            api.init()
            emit("status", text="TransferQueue initialised (2 SimpleStorage units)")
        else:
            api = RayStore(ray)
        try:
            for data in spec["workloads"]:
                w = wl.Workload.from_dict(data)
                emit("status", text=f"{w.name}: building the batch")

                def tick(name: str) -> None:
                    emit("tick", workload=name)

                try:
                    if w.kind == "small":
                        result = wl.drive_small(api, w, spec["reps"], spec["rounds"], tick)
                    else:
                        td = wl.build(w)
                        emit("status", text=f"{w.name}: measuring")
                        result = wl.drive_kv(api, w, td, spec["reps"], spec["rounds"], tick)
                        del td
                except Exception as exc:  # reported per workload; the next one still runs
                    emit(
                        "error",
                        workload=w.name,
                        error=f"{type(exc).__name__}: {exc}",
                        tb=traceback.format_exc(),
                    )
                    continue
                emit("result", workload=w.name, result=result)
        finally:
            if spec["system"] == "transferqueue":
                api.close()
    finally:
        ray.shutdown()
    emit("done")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.exit(main())
