"""``storage.backend = ray_rdt`` (Ray Direct Transport): not available yet -- a typed error says why.

The design (storage actors holding columns, handing tensors to readers with
``@ray.method(tensor_transport=...)`` over a collective group) is blocked on this machine by Ray
itself: with Ray 2.60, ``ray.experimental.collective.create_collective_group([holder, reader],
backend="torch_gloo")`` succeeds and a plain gloo ``all_reduce`` between the two actors works, but
the RDT transfer of a 4 MiB CPU tensor returned by a ``tensor_transport="gloo"`` method to the
other actor never arrives: ``TimeoutError: ObjectRef(...) not found in RDT object store after
60.0s, transfer may have failed`` (Ray then kills both actors and destroys the group); the same
with ``GLOO_SOCKET_IFNAME=lo`` and a 30 s ``RAY_rdt_fetch_fail_timeout_milliseconds``. A driver
``ray.get`` of such an object is refused ("two-sided transport GLOO"). The repro is
:data:`REPRO` (run it as a script). On CPU RDT would not beat the object store anyway; it is meant for GPU-resident
data (``nccl`` / ``nixl``), which needs a GPU machine to build and test.
"""

from __future__ import annotations

from tq_loader.errors import TQError
from tq_loader.storage.base import BackendInfo, StorageManager, register_storage_manager

__all__ = ["REPRO", "RayRdtUnavailableError", "unavailable_reason"]

REPRO = """\
import ray, torch
from ray.experimental.collective import create_collective_group
ray.init(num_cpus=8, include_dashboard=False)

@ray.remote
class Holder:
    def put(self, n): self.t = torch.arange(n, dtype=torch.float32)
    @ray.method(tensor_transport="gloo")
    def get(self): return self.t

@ray.remote
class Reader:
    def read(self, t): return float(t.sum())

h, r = Holder.remote(), Reader.remote()
create_collective_group([h, r], backend="torch_gloo")
ray.get(h.put.remote(1 << 20))
print(ray.get(r.read.remote(h.get.remote()), timeout=60))  # TimeoutError here (Ray 2.60, CPU)
"""


class RayRdtUnavailableError(TQError):
    """``storage.backend = ray_rdt`` cannot be used (see the message: why, and what to use)."""


def unavailable_reason() -> str:
    return (
        "storage.backend=ray_rdt is not available: Ray Direct Transport over gloo (Ray 2.60, CPU) times "
        "out between actors on this kind of machine (the tensor never reaches the reader; see "
        "tq_loader.storage.ray_rdt.REPRO), and the GPU transports (nccl, nixl) are not built yet. Use "
        "storage.backend=simple (fastest on one host), mooncake or yuanrong"
    )


def _refuse(info: BackendInfo) -> StorageManager:
    raise RayRdtUnavailableError(unavailable_reason())


register_storage_manager("ray_rdt", _refuse)
