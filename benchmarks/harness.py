"""What every benchmark group shares: timing by medians, a tq cluster per group, the ZMQ baselines.

The baselines run the same way tq_loader's embedded cluster does -- a server on its own thread
of this process, a client in the caller's thread, TCP loopback -- so that a ratio compares the
work each path does, not thread-versus-process placement.

* ``put_raw`` / ``get_raw``: the transport floor. The columns' own memory travels as zero-copy
  frames on a DEALER/ROUTER round trip; nothing is encoded, validated or stored.
* ``put_pickle`` / ``get_pickle``: ``pickle.dumps`` of the whole batch on one side, one frame,
  ``pickle.loads`` on the other -- the naive pickle-on-the-wire path. (TransferQueue's current
  ``serial_utils`` uses msgpack with zero-copy tensor frames and pickles only metadata and
  unknown types; this baseline is the plain pickle path, labelled as such in every report.)
"""

from __future__ import annotations

import contextlib
import gc
import pickle
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import zmq
from tensordict import TensorDict

import tq_loader as tq

__all__ = ["WireBaseline", "column_buffers", "gib_per_s", "median", "payload_bytes", "timed", "tq_cluster"]

GiB = float(1 << 30)

# A received zmq frame is read-only; the floor wraps it as a tensor without copying, as tq_loader does.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes; its result is freed only after the clock stopped, and
    garbage collection is held off while it runs (both would otherwise land in random rounds)."""
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        del result
        return elapsed
    finally:
        gc.enable()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def gib_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / GiB / seconds if seconds > 0 else float("nan")


def column_buffers(td: TensorDict) -> list[memoryview]:
    """The raw bytes of every column: one buffer per dense field, values + offsets per jagged one."""
    out: list[memoryview] = []
    for _, value in td.items():
        parts = [value.values(), value.offsets()] if value.is_nested else [value]
        out.extend(memoryview(part.contiguous().view(torch.uint8).numpy()) for part in parts)
    return out


def payload_bytes(td: TensorDict) -> int:
    return sum(b.nbytes for b in column_buffers(td))


@contextlib.contextmanager
def tq_cluster(num_units: int = 2, **controller: Any) -> Iterator[tq.Client]:
    """An embedded cluster for one benchmark group, closed (services stopped) afterwards."""
    conf: dict[str, Any] = {"storage": {"num_units": num_units}}
    if controller:
        conf["controller"] = controller
    tq.init(conf)
    try:
        yield tq.get_client()
    finally:
        tq.close()


class WireBaseline:
    """A ROUTER served on a thread and a DEALER for the caller: raw-frame and pickle round trips."""

    def __init__(self) -> None:
        self._ctx = zmq.Context()
        self._ready = threading.Event()
        self._port = 0
        self.held_frames: list[memoryview] = []  # what get_raw sends back
        self.held_object: Any = None  # what get_pickle sends back
        self.received: Any = None  # the last put's payload, kept alive like a store would
        self._thread = threading.Thread(target=self._serve, name="bench-router", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("baseline server thread did not start")
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"tcp://127.0.0.1:{self._port}")

    def _serve(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)  # created and used only on this thread
        sock.setsockopt(zmq.LINGER, 0)
        self._port = sock.bind_to_random_port("tcp://127.0.0.1")
        self._ready.set()
        try:
            while True:
                frames = sock.recv_multipart(copy=False)
                ident, op = frames[0], frames[1].bytes
                if op == b"stop":
                    sock.send_multipart([ident, b"ok"])
                    return
                if op == b"put-raw":
                    self.received = frames[2:]
                    sock.send_multipart([ident, b"ok"])
                elif op == b"put-pickle":
                    self.received = pickle.loads(frames[2].buffer)
                    sock.send_multipart([ident, b"ok"])
                elif op == b"get-raw":
                    sock.send_multipart([ident, b"ok", *self.held_frames], copy=False)
                elif op == b"get-pickle":
                    blob = pickle.dumps(self.held_object, protocol=pickle.HIGHEST_PROTOCOL)
                    sock.send_multipart([ident, b"ok", blob], copy=False)
                else:
                    sock.send_multipart([ident, b"unknown op"])
        finally:
            sock.close(linger=0)

    def _ack(self) -> None:
        reply = self._sock.recv()
        if reply != b"ok":
            raise RuntimeError(f"baseline server answered {reply!r}")

    def put_raw(self, buffers: Sequence[memoryview]) -> None:
        self._sock.send_multipart([b"put-raw", *buffers], copy=False)
        self._ack()

    def get_raw(self) -> list[torch.Tensor]:
        self._sock.send(b"get-raw")
        frames = self._sock.recv_multipart(copy=False)
        return [torch.frombuffer(f.buffer, dtype=torch.uint8) for f in frames[1:]]

    def put_pickle(self, obj: Any) -> None:
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self._sock.send_multipart([b"put-pickle", blob], copy=False)
        self._ack()

    def get_pickle(self) -> Any:
        self._sock.send(b"get-pickle")
        frames = self._sock.recv_multipart(copy=False)
        return pickle.loads(frames[1].buffer)

    def close(self) -> None:
        self._sock.send(b"stop")
        self._ack()
        self._thread.join(10)
        self._sock.close(linger=0)
        self._ctx.term()
        self.held_frames, self.held_object, self.received = [], None, None

    def __enter__(self) -> WireBaseline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
