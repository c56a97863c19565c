"""Helpers of the reliability suite: a ``tq-loader serve`` subprocess and raw wire requests.

Imported by the suite's tests and by the child programs they start (a test file run as a script
has this directory on ``sys.path``), so it depends on nothing but tq_loader's protocol and pyzmq.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from tq_loader import protocol as p

ENV_VARS = ("TQ_LOADER_ADDRESS", "TQ_LOADER_AUTH_TOKEN")


@dataclass
class Served:
    """A running ``tq-loader serve``: its process, controller address and captured stderr."""

    proc: subprocess.Popen
    address: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def child_env() -> dict[str, str]:
    """This environment without the variables that would attach a child to another cluster."""
    return {k: v for k, v in os.environ.items() if k not in ENV_VARS}


@contextmanager
def serve(*overrides: str, args: Sequence[str] = ()) -> Iterator[Served]:
    """Start ``tq-loader serve [args] overrides...``; stopped with SIGTERM (by pid) on exit."""
    with tempfile.TemporaryDirectory(prefix="tq-serve-") as tmp:
        stderr_path = Path(tmp) / "stderr.txt"
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tq_loader", "serve", *args, *overrides],
                stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(),
            )  # fmt: skip
        try:
            line = proc.stdout.readline()  # printed once the services listen; "" if it exited
            assert line.startswith("TQ_LOADER_ADDRESS="), f"serve did not start: {stderr_path.read_text()}"
            yield Served(proc, line.strip().split("=", 1)[1], stderr_path)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
            proc.stdout.close()


def raw_request(
    address: str, frames: Sequence[Any], *, timeout: float = 10.0
) -> tuple[p.ReplyEnvelope, list[bytes]]:
    """Send ``frames`` from a fresh DEALER socket and return the decoded reply (or fail)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(list(frames))
        assert sock.poll(int(timeout * 1000)), f"{address} did not answer within {timeout}s"
        header, *buffers = sock.recv_multipart()
        return p.decode_reply(header), buffers
    finally:
        sock.close()


def request(
    address: str,
    body: Any,
    buffers: Sequence[Any] = (),
    *,
    token: str | None = None,
    request_id: int = 1,
    timeout: float = 10.0,
) -> tuple[p.ReplyEnvelope, list[bytes]]:
    """One well-formed request (``timeout`` also travels as the server-side deadline)."""
    header = p.encode(p.RequestEnvelope(request_id, body, timeout, token))
    return raw_request(address, [header, *buffers], timeout=timeout + 5)


def describe(address: str, token: str | None = None) -> p.ClusterInfo:
    reply, _ = request(address, p.Describe(), token=token)
    assert reply.error_kind is None, reply
    return reply.body
