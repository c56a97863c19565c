"""The small key-value interface every KV storage backend (mooncake, yuanrong) implements.

A :class:`KVClient` only stores and fetches bytes by key; it knows nothing of rows, fields or
readiness -- the KV storage manager and the client core own those rules. It is synchronous: the
manager calls it from a worker thread, and every call either completes, raises a typed
:class:`~tq_loader.errors.TQError`, or gives up within the backend's configured timeout.

Why the interface has more than ``put`` / ``get`` / ``delete``:

* ``get_into`` -- the manager usually knows each value's size from the field schema and can hand
  the backend the destination tensors' memory: Mooncake then transfers straight into it
  (``batch_get_into``), no intermediate buffer.
* ``reserve`` -> :class:`PendingPut` -- both real backends write through buffers *they* own
  (Yuanrong: ``mcreate`` -> fill -> ``mset_buffer``; Mooncake's shared-memory client: its
  registered staging arena -> ``batch_upsert_from``). Handing those buffers to the caller lets it
  gather rows straight into backend memory: one copy instead of two.
* ``zero_copy_get`` -- whether ``get`` returns views of the backend's memory (Yuanrong's
  ``get_buffers``: read-only views of shared memory that stay valid while referenced) or
  caller-owned copies.

The rules every implementation keeps (checked once here, in the public methods):

* keys of one call are distinct non-empty strings, values non-empty (neither backend can store a
  zero-length value: the manager must not send empty buffers);
* ``put`` overwrites (both backends are told to upsert). A failed put raises and removes the keys
  that call did write, so no half batch stays readable or holds memory; the caller must treat
  every key of a failed call as unwritten (the manager then never marks those rows produced);
* ``get`` of a missing key raises :class:`~tq_loader.errors.NotFoundError` naming the keys;
* ``delete`` ignores missing keys; a dead service raises :class:`~tq_loader.errors.TQConnectionError`,
  a full one :class:`~tq_loader.errors.CapacityError`.

This module also holds what the backends' service bootstraps share: free loopback ports, a
bounded ``wait_until`` and stopping a process by pid.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tq_loader.errors import ClosedError, NotFoundError, SchemaError, TQConnectionError, TQTimeoutError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "KVClient",
    "KVStats",
    "PendingPut",
    "free_port",
    "pid_alive",
    "stop_pid",
    "wait_until",
]


@dataclass(frozen=True)
class KVStats:
    """A snapshot of one KV client's counters (calls, keys, bytes, seconds spent in the backend)."""

    backend: str
    puts: int = 0
    gets: int = 0
    deletes: int = 0
    keys_put: int = 0
    keys_got: int = 0
    keys_deleted: int = 0
    bytes_put: int = 0
    bytes_got: int = 0
    errors: int = 0
    put_seconds: float = 0.0
    get_seconds: float = 0.0
    services: dict[str, str] = field(default_factory=dict)  # role -> address

    def as_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


class PendingPut:
    """Writable buffers for a batch of keys; :meth:`commit` stores them all, :meth:`abort` drops them.

    Used as a context manager it commits on a clean exit and aborts on an exception. Buffers must
    not be used after commit/abort.
    """

    def __init__(
        self,
        keys: list[str],
        buffers: list[memoryview],
        commit: Callable[[], None],
        abort: Callable[[], None] = lambda: None,
    ) -> None:
        self.keys = keys
        self.buffers = buffers
        self._commit = commit
        self._abort = abort
        self._done = False

    def commit(self) -> None:
        if self._done:
            raise ClosedError("this PendingPut was already committed or aborted")
        self._done = True
        try:
            self._commit()
        finally:
            self.buffers = []

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self.buffers = []
            self._abort()

    def __enter__(self) -> PendingPut:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def as_bytes_view(value: Any) -> memoryview:
    """``value`` (anything with the buffer protocol, C-contiguous) as a flat byte memoryview."""
    try:
        view = memoryview(value)
    except TypeError:
        raise SchemaError(
            f"a KV value must support the buffer protocol (bytes, memoryview, numpy array), "
            f"got {type(value).__name__}"
        ) from None
    if not view.c_contiguous:
        raise SchemaError("a KV value must be C-contiguous; pass .contiguous() / np.ascontiguousarray")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class KVClient(ABC):
    """Batched byte storage by key. Subclasses implement the ``_``-prefixed hooks."""

    name: ClassVar[str]
    zero_copy_get: ClassVar[bool] = False  # get() returns views of backend memory (no copy)
    zero_copy_put: ClassVar[bool] = False  # reserve() hands out backend memory (fill = the only copy)
    lists_keys: ClassVar[bool] = False  # delete_prefix() removes every key under a prefix

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Any] = dict.fromkeys(
            (
                "puts",
                "gets",
                "deletes",
                "keys_put",
                "keys_got",
                "keys_deleted",
                "bytes_put",
                "bytes_got",
                "errors",
            ),
            0,
        )
        self._counts.update(put_seconds=0.0, get_seconds=0.0)
        self._closed = False

    # ------------------------------------------------------------------ public API
    def put(self, keys: Sequence[str], values: Sequence[Buffer]) -> None:
        """Store ``values[i]`` under ``keys[i]`` (overwriting); values may be reused after return."""
        keys = self._check_keys(keys)
        views = [as_bytes_view(v) for v in values]
        if len(views) != len(keys):
            raise SchemaError(f"put(): {len(keys)} keys but {len(views)} values")
        self._check_sizes(keys, [v.nbytes for v in views])
        if keys:
            self._timed("put", len(keys), sum(v.nbytes for v in views), self._put, keys, views)

    def get(self, keys: Sequence[str]) -> list[memoryview]:
        """The bytes of each key, in order (views of backend memory if ``zero_copy_get``)."""
        keys = self._check_keys(keys)
        if not keys:
            return []
        out = self._timed("get", len(keys), None, self._get, keys)
        self._add("bytes_got", sum(v.nbytes for v in out))
        return out

    def get_into(self, keys: Sequence[str], buffers: Sequence[Buffer]) -> None:
        """Read each key into ``buffers[i]``, whose size must equal the stored value's."""
        keys = self._check_keys(keys)
        views = [as_bytes_view(b) for b in buffers]
        if len(views) != len(keys):
            raise SchemaError(f"get_into(): {len(keys)} keys but {len(views)} buffers")
        if any(v.readonly for v in views):
            raise SchemaError("get_into(): the destination buffers must be writable")
        if keys:
            self._timed("get", len(keys), sum(v.nbytes for v in views), self._get_into, keys, views)

    def get_views(
        self,
        keys: Sequence[str],
        sizes: Sequence[int] | None,
        consume: Callable[[list[str], list[memoryview]], None],
    ) -> None:
        """Read ``keys`` and hand their bytes to ``consume(keys, views)``, in one or more calls, with
        views valid only during the call: the caller copies straight out of backend or staging
        memory (one copy). ``sizes``: the stored sizes when known (saves a size lookup)."""
        keys = self._check_keys(keys)
        if sizes is not None and len(sizes) != len(keys):
            raise SchemaError(f"get_views(): {len(keys)} keys but {len(sizes)} sizes")
        if keys:
            nbytes = None if sizes is None else sum(int(n) for n in sizes)
            self._timed("get", len(keys), nbytes, self._get_views, keys, sizes, consume)

    def reserve(self, keys: Sequence[str], sizes: Sequence[int]) -> PendingPut:
        """Writable buffers of ``sizes`` for ``keys``: fill them, then ``commit()`` stores them all."""
        keys = self._check_keys(keys)
        sizes = [int(s) for s in sizes]
        if len(sizes) != len(keys):
            raise SchemaError(f"reserve(): {len(keys)} keys but {len(sizes)} sizes")
        self._check_sizes(keys, sizes)
        buffers, commit, abort = self._reserve(keys, sizes)
        nbytes = sum(sizes)
        return PendingPut(keys, buffers, lambda: self._timed("put", len(keys), nbytes, commit), abort)

    def delete(self, keys: Sequence[str]) -> None:
        """Remove ``keys``; keys that are not stored are ignored."""
        keys = self._check_keys(keys)
        if keys:
            self._timed("delete", len(keys), None, self._delete, keys)

    def delete_prefix(self, prefix: str) -> int | None:
        """Remove every key that starts with ``prefix``; the number removed, or None where the backend
        cannot list keys (the caller then deletes the keys it knows)."""
        self._check_keys([prefix])
        return self._timed("delete", 1, None, self._delete_prefix, prefix)

    def put_if_absent(self, key: str, value: Buffer) -> bool:
        """Store ``value`` under ``key`` only if no value is stored there; whether it was stored
        (atomic where the backend offers it: Yuanrong's NX set)."""
        keys = self._check_keys([key])
        view = as_bytes_view(value)
        self._check_sizes(keys, [view.nbytes])
        return bool(self._timed("put", 1, view.nbytes, self._put_if_absent, key, view))

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored (to tell which keys of a failed get are gone)."""
        keys = self._check_keys(keys)
        return self._exists(keys) if keys else []

    def close(self) -> None:
        """Disconnect; later calls raise :class:`ClosedError`. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close()

    def statistics(self) -> KVStats:
        with self._lock:
            counts = dict(self._counts)
        return KVStats(backend=self.name, services=self.services(), **counts)

    def services(self) -> dict[str, str]:
        """The addresses this client talks to, by role (for status views)."""
        return {}

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def _put(self, keys: list[str], values: list[memoryview]) -> None: ...

    @abstractmethod
    def _get(self, keys: list[str]) -> list[memoryview]: ...

    def _get_into(self, keys: list[str], buffers: list[memoryview]) -> None:
        for key, src, dst in zip(keys, self._get(keys), buffers, strict=True):
            if src.nbytes != dst.nbytes:
                raise SchemaError(f"key {key!r} holds {src.nbytes} bytes but its buffer has {dst.nbytes}")
            dst[:] = src

    def _get_views(
        self,
        keys: list[str],
        sizes: Sequence[int] | None,
        consume: Callable[[list[str], list[memoryview]], None],
    ) -> None:
        views = self._get(keys)
        if sizes is None:
            self._add("bytes_got", sum(v.nbytes for v in views))
        consume(keys, views)

    def _reserve(
        self, keys: list[str], sizes: list[int]
    ) -> tuple[list[memoryview], Callable[[], None], Callable[[], None]]:
        """(writable buffers, commit, abort); the default stages in fresh memory and puts on commit."""
        buffers = [memoryview(bytearray(n)) for n in sizes]
        return buffers, lambda: self._put(keys, buffers), lambda: None

    @abstractmethod
    def _delete(self, keys: list[str]) -> None: ...

    def _delete_prefix(self, prefix: str) -> int | None:
        return None

    def _put_if_absent(self, key: str, value: memoryview) -> bool:
        if self._exists([key])[0]:  # check-then-put: only for backends without an atomic form
            return False
        self._put([key], [value])
        return True

    def _exists(self, keys: list[str]) -> list[bool]:
        out = []
        for key in keys:  # one call per key: only used to explain a failed get
            try:
                self._get([key])
                out.append(True)
            except NotFoundError:
                out.append(False)
        return out

    @abstractmethod
    def _close(self) -> None: ...

    # ------------------------------------------------------------------ plumbing
    def _check_keys(self, keys: Sequence[str]) -> list[str]:
        if self._closed:
            raise ClosedError(f"the {self.name} KV client is closed; make a new one")
        if isinstance(keys, str):
            raise SchemaError("pass a sequence of keys, not one string")
        keys = list(keys)
        for key in keys:
            if not isinstance(key, str) or not key:
                raise SchemaError(f"KV keys must be non-empty strings, got {key!r}")
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
            raise SchemaError(f"a KV call names the same key more than once: {dup}")
        return keys

    def _check_sizes(self, keys: list[str], sizes: list[int]) -> None:
        empty = [k for k, n in zip(keys, sizes) if n <= 0]
        if empty:
            raise SchemaError(
                f"the {self.name} backend cannot store zero-length values (keys {empty[:5]}); "
                "skip empty buffers and record their emptiness in the metadata instead"
            )

    def _add(self, name: str, amount: Any) -> None:
        with self._lock:
            self._counts[name] += amount

    def _timed(self, op: str, nkeys: int, nbytes: int | None, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            result = fn(*args)
        except BaseException:
            self._add("errors", 1)
            raise
        elapsed = time.perf_counter() - start
        with self._lock:
            c = self._counts
            c[op + "s"] += 1
            c["keys_" + ("deleted" if op == "delete" else "got" if op == "get" else "put")] += nkeys
            if nbytes is not None and op != "delete":
                c["bytes_" + ("got" if op == "get" else "put")] += nbytes
            if op in ("put", "get"):
                c[op + "_seconds"] += elapsed
        return result


# --------------------------------------------------------------------------- service helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    abort: Callable[[], str | None] | None = None,
) -> None:
    """Poll ``condition`` until it holds; ``TQTimeoutError`` after ``timeout`` seconds.

    ``abort`` returns a reason to stop early (e.g. the process being waited on exited), raised as
    :class:`TQConnectionError`.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        reason = abort() if abort is not None else None
        if reason:
            raise TQConnectionError(f"{what}: {reason}")
        if time.monotonic() >= deadline:
            raise TQTimeoutError(f"{what}: not ready within {timeout:.0f} s")
        time.sleep(interval)  # an external service offers no event to wait on: poll, bounded


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (a zombie child of ours counts as gone)."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child: fall through to the signal probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM ``pid``, wait up to ``timeout``, then SIGKILL; True if it is gone afterwards."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid):
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.02)  # not necessarily our child (no waitpid): poll its pid, bounded
    return not pid_alive(pid)
