"""The limits every tq_loader figure is divided by, measured in the same run on the same batches.

* raw pyzmq PUSH/PULL loopback between two processes, zero-copy frames both ways: the wire limit
  of a cross-process transfer (``drivers/zmq_peer.py`` is the other process);
* a torch copy of the batch's column bytes into memory already touched, and ``td.clone()`` into
  fresh memory: the memory limits (the second pays the page faults a fresh allocation costs);
* Ray's object store: ``ray.put`` / ``ray.get`` of the same TensorDict, in a Ray instance of its own.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
import zmq
from tensordict import NonTensorStack, TensorDict

from tq_loader.bench import subproc
from tq_loader.bench.registry import Context, System, register_system
from tq_loader.bench.results import KIND_BASELINE
from tq_loader.bench.workloads import Workload, build, column_bytes, fingerprint, timed

__all__ = ["RAY", "TORCH_CLONE", "TORCH_COPY", "ZMQ"]

ZMQ = "raw pyzmq PUSH/PULL, 2 processes"
TORCH_COPY = "torch copy into touched memory"
TORCH_CLONE = "torch clone into fresh memory"
RAY = "Ray object store put/get"
BATCH_CASES = frozenset({"simple", "complex"})
_WAIT_MS = 120_000  # no reply from the peer in this long means it is gone


def _recv(sock: zmq.Socket, what: str, *, multipart: bool = False) -> Any:
    if not sock.poll(_WAIT_MS):
        raise RuntimeError(f"the pyzmq peer sent no {what} within {_WAIT_MS // 1000} s")
    return sock.recv_multipart(copy=False) if multipart else sock.recv()


def _zmq_rounds(push: zmq.Socket, pull: zmq.Socket, td: TensorDict, reps: int, rounds: int) -> dict[str, Any]:
    columns = column_bytes(td)
    frames = [memoryview(c.numpy()) for c in columns]
    nbytes = sum(f.nbytes for f in frames)

    def put() -> None:
        push.send_multipart([b"put", *frames], copy=False)
        if (ack := _recv(pull, "put acknowledgement")) != b"ok":
            raise RuntimeError(f"the pyzmq peer answered {ack!r}")

    def get() -> list[torch.Tensor]:
        push.send(b"get")
        return [torch.frombuffer(f.buffer, dtype=torch.uint8) for f in _recv(pull, "frames", multipart=True)]

    put()
    back = get()
    if [bytes(b.numpy()[:64]) for b in back] != [bytes(c.numpy()[:64]) for c in columns]:
        raise AssertionError("the pyzmq peer sent back other bytes than it was sent")
    del back
    samples: dict[str, list[float]] = {"put": [], "get": []}
    for _ in range(reps * rounds):
        put_s, _ = timed(put)
        get_s, got = timed(get)
        del got
        samples["put"].append(nbytes / put_s / 1e9)
        samples["get"].append(nbytes / get_s / 1e9)
    return {"samples": samples, "bytes": nbytes, "fingerprint": fingerprint(td)}


def run_zmq(ctx: Context, workloads: list[Workload]) -> dict[str, dict[str, Any]]:
    zctx = zmq.Context()
    push, pull = zctx.socket(zmq.PUSH), zctx.socket(zmq.PULL)
    for sock in (push, pull):
        sock.setsockopt(zmq.LINGER, 0)
    push_port = push.bind_to_random_port("tcp://127.0.0.1")
    pull_port = pull.bind_to_random_port("tcp://127.0.0.1")
    log = open(ctx.out / "logs" / "zmq_peer.log", "a")  # noqa: SIM115 -- closed in finally
    peer = subprocess.Popen(
        [sys.executable, str(subproc.DRIVERS / "zmq_peer.py"), str(push_port), str(pull_port)],
        stdout=log, stderr=subprocess.STDOUT, env=subproc.child_env(),
    )  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    try:
        if _recv(pull, "ready signal") != b"ready":
            raise RuntimeError("the pyzmq peer did not start")
        for w in workloads:
            ctx.status(f"{w.name}: {ZMQ}")
            out[w.name] = _zmq_rounds(push, pull, build(w), ctx.plan.reps, ctx.plan.rounds)
        push.send(b"stop")
        _recv(pull, "goodbye")
        peer.wait(timeout=30)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait(timeout=30)
        push.close(linger=0)
        pull.close(linger=0)
        zctx.term()
        log.close()
    return out


def _tensor_only(td: TensorDict) -> bool:
    values = [td.get(k) for k in td.keys()]  # noqa: SIM118 -- iterating a TensorDict yields its rows
    return not any(isinstance(v, NonTensorStack) or v.is_nested for v in values)


def _memory_op(td: TensorDict, columns: list[torch.Tensor], fresh: bool) -> tuple[Callable[[], Any], str]:
    """The timed operation and how it is described."""
    if fresh and _tensor_only(td):
        return td.clone, "td.clone()"
    if fresh:
        return (lambda: [c.clone() for c in columns]), "clone of each column's bytes"
    targets = [c.clone() for c in columns]  # touched once, reused every round
    return (lambda: [t.copy_(c) for t, c in zip(targets, columns)]), ""


def run_torch(ctx: Context, workloads: list[Workload], *, fresh: bool) -> dict[str, dict[str, Any]]:
    """``fresh``: ``td.clone()`` (a batch of only dense tensors) or a clone of each column's bytes;
    otherwise ``copy_`` of each column's bytes into buffers that were written once before."""
    out: dict[str, dict[str, Any]] = {}
    for w in workloads:
        ctx.status(f"{w.name}: {TORCH_CLONE if fresh else TORCH_COPY}")
        td = build(w)
        columns = column_bytes(td)
        nbytes = sum(int(c.numel()) for c in columns)
        op, note = _memory_op(td, columns, fresh)
        op()
        values = []
        for _ in range(ctx.plan.reps * ctx.plan.rounds):
            seconds, result = timed(op)
            del result
            values.append(nbytes / seconds / 1e9)
        metric = "clone" if fresh else "copy"
        out[w.name] = {
            "samples": {metric: values},
            "bytes": nbytes,
            "fingerprint": fingerprint(td),
            "note": note,
        }
    return out


def run_ray(ctx: Context, workloads: list[Workload]) -> dict[str, dict[str, Any]]:
    from tq_loader.bench.transferqueue import run_driver

    try:
        return run_driver(ctx, "ray", sys.executable, workloads, RAY)
    except subproc.DriverError as exc:
        for w in workloads:
            ctx.skip(w.name, RAY, str(exc))
        return {}


register_system(System(ZMQ, KIND_BASELINE, run_zmq, BATCH_CASES, note="copy=False frames, TCP loopback"))
register_system(System(TORCH_COPY, KIND_BASELINE, lambda c, w: run_torch(c, w, fresh=False), BATCH_CASES))
register_system(System(TORCH_CLONE, KIND_BASELINE, lambda c, w: run_torch(c, w, fresh=True), BATCH_CASES))
register_system(
    System(RAY, KIND_BASELINE, run_ray, BATCH_CASES, note="pickled TensorDict, own Ray instance", quick=False)
)
