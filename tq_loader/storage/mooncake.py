"""Mooncake Store as a :class:`~tq_loader.storage.kv_client.KVClient`, and its local services.

Where the bytes live: in Mooncake, values sit in *segments* that real clients mount. If every
user process mounted its own segment, a producer's rows would vanish when it exits. So the local
bootstrap (:class:`MooncakeMaster`) runs two processes: ``mooncake_master`` (with its HTTP
metadata server) and one ``mooncake_client`` *store process* that owns the memory
(``global_segment_size``). User processes then connect in one of two ways (``client_mode``):

* ``"dummy"`` (default, same host): a Mooncake *dummy client* of the store process. Values move
  through a shared-memory staging arena that the store process copies from/to (~7 GB/s put,
  ~10 GB/s get here) -- no socket for the bytes.
* ``"real"``: a full transfer-engine client (``tcp`` or ``rdma``), for other hosts. It can also
  contribute memory (``global_segment_size`` > 0), at the price of those values dying with it.

Either way values go through a registered staging arena of ``local_buffer_size`` bytes with the
zero-copy batch calls (``batch_upsert_from`` / ``batch_get_into``); a batch bigger than the arena
moves in rounds, a single value bigger than it is a :class:`CapacityError`. Mooncake's own
``BufferPool`` would do the arena, but it refuses dummy clients, hence the small allocator here.
Objects are written hard-pinned (Mooncake never evicts them: a full store is a CapacityError, not
silent loss) and with upsert semantics (a plain Mooncake put of an existing key keeps the old value).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tq_loader.backend_config import MooncakeConfig
from tq_loader.errors import CapacityError, NotFoundError, SchemaError, TQConnectionError, TQError
from tq_loader.storage.kv_client import KVClient, free_port, pid_alive, port_open, stop_pid, wait_until

__all__ = ["MooncakeConfig", "MooncakeKVClient", "MooncakeMaster", "mooncake_available"]

_ALIGN = 64


def mooncake_available() -> str | None:
    """None if the Mooncake store can be used here, else what to install."""
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        return (
            f"Mooncake is not usable ({exc}); install it with `pip install mooncake-transfer-engine-non-cuda` "
            "(CPU build; the CUDA build is `mooncake-transfer-engine`) and the system library libibverbs1 "
            "(`apt-get install -y libibverbs1`)"
        )
    return None


# Mooncake's ErrorCode values (mooncake-store/include/types.h) -> our error types.
_NOT_FOUND = {-704, -710, -712}
_CAPACITY = {-10, -200, -1700}
_CONNECTION = {-101, -103, -707, -800, -900, -901, -1010}
_BAD_INPUT = {-400, -600}


def _error(code: int, what: str) -> TQError:
    hint = {
        -200: "the Mooncake store is full: free rows (clear) or raise storage.mooncake.global_segment_size",
        -900: "the Mooncake master or store process is unreachable",
        -800: "a Mooncake transfer failed (the process holding the value may be gone)",
    }.get(code, f"Mooncake error code {code}")
    cls: type[TQError] = TQError
    if code in _NOT_FOUND:
        cls = NotFoundError
    elif code in _CAPACITY:
        cls = CapacityError
    elif code in _CONNECTION:
        cls = TQConnectionError
    elif code in _BAD_INPUT:
        cls = SchemaError
    return cls(f"{what}: {hint} (code {code})")


class _Arena:
    """First-fit allocator over one registered region; callers wait (bounded) for space."""

    def __init__(self, base: int, size: int, timeout: float) -> None:
        self.base, self.size, self.timeout = base, size, timeout
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted, coalesced
        self._cond = threading.Condition()

    def alloc(self, nbytes: int) -> int:
        nbytes = -(-nbytes // _ALIGN) * _ALIGN
        if nbytes > self.size:
            raise CapacityError(
                f"a Mooncake value of {nbytes} bytes exceeds this client's staging arena ({self.size} bytes); "
                "raise storage.mooncake.local_buffer_size or store smaller values"
            )
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                for i, (off, length) in enumerate(self._free):
                    if length >= nbytes:
                        self._free[i : i + 1] = [(off + nbytes, length - nbytes)] if length > nbytes else []
                        return off
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CapacityError(
                        f"no {nbytes} bytes free in the Mooncake staging arena for {self.timeout:.0f} s "
                        "(other calls hold it); raise storage.mooncake.local_buffer_size"
                    )
                self._cond.wait(left)

    def release(self, offset: int, nbytes: int) -> None:
        nbytes = -(-nbytes // _ALIGN) * _ALIGN
        with self._cond:
            spans = sorted([*self._free, (offset, nbytes)])
            merged = [spans[0]]
            for off, length in spans[1:]:
                last_off, last_len = merged[-1]
                if last_off + last_len == off:
                    merged[-1] = (last_off, last_len + length)
                else:
                    merged.append((off, length))
            self._free = merged
            self._cond.notify_all()

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview((ctypes.c_char * nbytes).from_address(self.base + offset)).cast("B")


def _rounds(sizes: list[int], capacity: int) -> list[tuple[int, int, int]]:
    """Split consecutive values into rounds of at most ``capacity`` aligned bytes: (start, stop, bytes)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        n = -(-n // _ALIGN) * _ALIGN
        if i > start and total + n > capacity:
            out.append((start, i, total))
            start, total = i, 0
        total += n
    out.append((start, len(sizes), total))
    return out


class MooncakeKVClient(KVClient):
    """A :class:`KVClient` over ``mooncake.store.MooncakeDistributedStore``.

    ``zero_copy_put``: :meth:`reserve` hands out staging-arena memory the store reads directly.
    """

    name = "mooncake"
    zero_copy_put = True
    lists_keys = True  # remove_by_regex

    def __init__(self, config: MooncakeConfig) -> None:
        missing = mooncake_available()
        if missing:
            raise TQConnectionError(missing)
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig

        super().__init__()
        self.config = config
        self._store = MooncakeDistributedStore()
        if config.client_mode == "dummy":
            if not config.store_address:
                raise TQConnectionError(
                    "storage.mooncake.store_address is empty: a dummy client needs the address of a "
                    "same-host mooncake_client store process (MooncakeMaster starts one), or use client_mode=real"
                )
            rc = self._store.setup_dummy(0, 1 << 20, config.store_address)
            where = f"store process {config.store_address}"
            base = self._store.alloc_from_mem_pool(config.local_buffer_size) if rc == 0 else 0
            self._arena_memory: Any = None
        elif config.client_mode == "real":
            # The transfer engine advertises this address to peers (Mooncake reads it at setup).
            os.environ.setdefault("MC_TCP_BIND_ADDRESS", config.local_hostname)
            rc = self._store.setup(
                config.local_hostname,
                config.metadata_server,
                config.client_segment_size,
                16 << 20,
                config.protocol,
                config.device_name,
                config.master_server_address,
            )
            where = f"master {config.master_server_address} / metadata {config.metadata_server}"
            self._arena_memory = np.ones(config.local_buffer_size, dtype=np.uint8)  # touched once, reused
            base = self._arena_memory.ctypes.data
        else:
            raise SchemaError(
                f"storage.mooncake.client_mode must be dummy or real, got {config.client_mode!r}"
            )
        if rc != 0 or not base:
            self._store.close()
            raise TQConnectionError(f"cannot connect to Mooncake ({where}): setup returned {rc}")
        reg = self._store.register_buffer(base, config.local_buffer_size)
        if reg != 0:
            self._store.close()
            raise TQConnectionError(f"Mooncake refused to register the staging arena (code {reg})")
        self._base = base
        self.max_call_bytes = config.local_buffer_size  # one reserve() must fit the staging arena
        self._arena = _Arena(base, config.local_buffer_size, config.staging_timeout)
        self._replicate = ReplicateConfig()
        self._replicate.with_hard_pin = True  # never evicted: a full store says so instead

    def services(self) -> dict[str, str]:
        c = self.config
        out = {"master": c.master_server_address, "metadata": c.metadata_server}
        if c.client_mode == "dummy":
            out["store"] = c.store_address
        return {k: v for k, v in out.items() if v}

    # ------------------------------------------------------------------ hooks
    def _put(self, keys: list[str], values: list[memoryview]) -> None:
        def fill(offsets: list[int], start: int, stop: int) -> None:
            for off, value in zip(offsets, values[start:stop]):
                self._arena.view(off, value.nbytes)[:] = value

        self._put_rounds(keys, [v.nbytes for v in values], fill)

    def _put_rounds(self, keys: list[str], sizes: list[int], fill: Any) -> None:
        done: list[str] = []
        try:
            for start, stop, total in _rounds(sizes, self._arena.size):
                chunk = self._arena.alloc(total)
                try:
                    offsets = self._layout(chunk, sizes[start:stop])
                    fill(offsets, start, stop)
                    self._commit_at(keys[start:stop], offsets, sizes[start:stop])
                finally:
                    self._arena.release(chunk, total)
                done += keys[start:stop]
        except BaseException:
            if done:  # earlier rounds too: no half batch stays readable (see KVClient)
                self._store.batch_remove(done, True)
            raise

    def _reserve(self, keys: list[str], sizes: list[int]) -> Any:
        total = sum(-(-n // _ALIGN) * _ALIGN for n in sizes)
        if total > self._arena.size:
            raise CapacityError(
                f"reserve() of {total} bytes exceeds the Mooncake staging arena ({self._arena.size} bytes); "
                "reserve fewer keys per call or raise storage.mooncake.local_buffer_size"
            )
        chunk = self._arena.alloc(total)
        offsets = self._layout(chunk, sizes)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._arena.release(chunk, total)

        def commit() -> None:
            try:
                self._commit_at(keys, offsets, sizes)
            finally:
                release()

        return [self._arena.view(o, n) for o, n in zip(offsets, sizes)], commit, release

    def _commit_at(self, keys: list[str], offsets: list[int], sizes: list[int]) -> None:
        """One ``batch_upsert_from`` of arena offsets; on any failure the keys it wrote are removed."""
        codes = self._store.batch_upsert_from(keys, [self._base + o for o in offsets], sizes, self._replicate)
        failed = [(k, c) for k, c in zip(keys, codes) if c != 0]
        if failed:
            written = [k for k, c in zip(keys, codes) if c == 0]
            if written:
                self._store.batch_remove(written, True)
            raise _error(failed[0][1], f"put of {len(failed)} key(s) such as {failed[0][0]!r}")

    def _sizes(self, keys: list[str]) -> list[int]:
        sizes = [self._store.get_size(k) for k in keys]
        missing = [k for k, n in zip(keys, sizes) if n == -704]
        if missing:
            raise NotFoundError(f"Mooncake has no value for {len(missing)} key(s): {missing[:8]}")
        bad = [(k, n) for k, n in zip(keys, sizes) if n < 0]
        if bad:
            raise _error(bad[0][1], f"size of key {bad[0][0]!r}")
        return sizes

    def _get(self, keys: list[str]) -> list[memoryview]:
        sizes = self._sizes(keys)
        out = [memoryview(np.empty(n, dtype=np.uint8)) for n in sizes]
        self._get_into(keys, out)
        return out

    def _get_into(self, keys: list[str], buffers: list[memoryview]) -> None:
        done = 0  # _get_views hands the keys over in order, a round at a time

        def copy_out(chunk_keys: list[str], views: list[memoryview]) -> None:
            nonlocal done
            for dst, view in zip(buffers[done : done + len(views)], views):
                dst[:] = view
            done += len(views)

        self._get_views(keys, [b.nbytes for b in buffers], copy_out)

    def _get_views(self, keys: list[str], sizes: Any, consume: Any) -> None:
        sizes = self._sizes(keys) if sizes is None else [int(n) for n in sizes]
        for start, stop, total in _rounds(sizes, self._arena.size):
            chunk = self._arena.alloc(total)
            try:
                offsets = self._layout(chunk, sizes[start:stop])
                got = self._store.batch_get_into(
                    keys[start:stop], [self._base + o for o in offsets], sizes[start:stop]
                )
                self._check_read(keys[start:stop], sizes[start:stop], got)
                consume(
                    keys[start:stop], [self._arena.view(o, n) for o, n in zip(offsets, sizes[start:stop])]
                )
            finally:
                self._arena.release(chunk, total)

    def _check_read(self, keys: list[str], sizes: list[int], got: list[int]) -> None:
        missing = [k for k, n in zip(keys, got) if n == -704]
        if missing:
            raise NotFoundError(f"Mooncake has no value for {len(missing)} key(s): {missing[:8]}")
        for key, want, n in zip(keys, sizes, got):
            if n == -600 or (n >= 0 and n != want):
                stored = self._store.get_size(key)
                raise SchemaError(f"key {key!r} holds {stored} bytes but its buffer has {want}")
            if n < 0:
                raise _error(n, f"get of key {key!r}")

    def _delete(self, keys: list[str]) -> None:
        codes = self._store.batch_remove(keys, True)
        bad = [(k, c) for k, c in zip(keys, codes) if c not in (0, -704)]
        if bad:
            raise _error(bad[0][1], f"delete of {len(bad)} key(s) such as {bad[0][0]!r}")

    def _delete_prefix(self, prefix: str) -> int | None:
        removed = self._store.remove_by_regex("^" + re.escape(prefix), True)
        if removed < 0:
            raise _error(removed, f"delete of the keys under {prefix!r}")
        return removed

    def _exists(self, keys: list[str]) -> list[bool]:
        codes = self._store.batch_is_exist(keys)
        bad = [(k, c) for k, c in zip(keys, codes) if c < 0]
        if bad:
            raise TQConnectionError(
                f"Mooncake could not tell whether key {bad[0][0]!r} exists (code {bad[0][1]})"
            )
        return [c == 1 for c in codes]

    def _close(self) -> None:
        self._store.unregister_buffer(self._base)
        self._store.close()
        self._arena_memory = None

    @staticmethod
    def _layout(chunk: int, sizes: list[int]) -> list[int]:
        offsets, off = [], chunk
        for n in sizes:
            offsets.append(off)
            off += -(-n // _ALIGN) * _ALIGN
        return offsets


# --------------------------------------------------------------------------- local services


def _binary(name: str) -> str:
    """Path of an executable shipped inside the mooncake package (no PATH needed)."""
    import mooncake

    path = Path(mooncake.__file__).parent / name
    if path.is_file():
        if not os.access(path, os.X_OK):
            path.chmod(path.stat().st_mode | 0o111)
        return str(path)
    found = shutil.which(name)
    if not found:
        raise TQConnectionError(
            f"the Mooncake binary {name} is missing; reinstall mooncake-transfer-engine-non-cuda"
        )
    return found


def _http_ok(url: str, needle: str = "") -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as reply:  # loopback only, our own service
            return reply.status == 200 and needle in reply.read().decode("utf-8", "replace")
    except OSError:
        return False


class MooncakeMaster:
    """The Mooncake services of a cluster: started here (and stopped by pid on :meth:`close`) or attached.

    Started locally: ``mooncake_master`` with its HTTP metadata server, plus (``global_segment_size``
    > 0) one ``mooncake_client`` store process that owns the memory, all on free loopback ports.
    :attr:`config` is the :class:`MooncakeConfig` with every address filled in, for clients here or
    in other processes.
    """

    def __init__(
        self, config: MooncakeConfig, procs: list[subprocess.Popen[bytes]], log_dir: str | None
    ) -> None:
        self.config = config
        self._procs = procs
        self._log_dir = log_dir

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @classmethod
    def open(cls, config: MooncakeConfig | None = None) -> MooncakeMaster:
        """Attach when ``master_server_address`` is set, else start local services (``auto_start``)."""
        config = config or MooncakeConfig()
        if config.master_server_address:
            return cls.attach(config)
        if not config.auto_start:
            raise TQConnectionError(
                "storage.mooncake.master_server_address is empty and auto_start is off; "
                "give the address of a running mooncake_master or set auto_start: true"
            )
        return cls.start(config)

    @classmethod
    def attach(cls, config: MooncakeConfig) -> MooncakeMaster:
        """Use running services (nothing is stopped on close); checks the master answers."""
        host, _, port = config.master_server_address.rpartition(":")
        if not port.isdigit() or not port_open(host or "127.0.0.1", int(port), timeout=2.0):
            raise TQConnectionError(f"no Mooncake master answers at {config.master_server_address!r}")
        return cls(config, [], None)

    @classmethod
    def start(cls, config: MooncakeConfig) -> MooncakeMaster:
        """Start master (+ store process) on free loopback ports and wait until they serve."""
        missing = mooncake_available()
        if missing:
            raise TQConnectionError(missing)
        log_dir = tempfile.mkdtemp(prefix="tq_mooncake_")
        procs: list[subprocess.Popen[bytes]] = []
        host = "127.0.0.1"
        env = {**os.environ, "MC_TCP_BIND_ADDRESS": host}
        try:
            rpc, http, metrics = free_port(), free_port(), free_port()
            procs.append(
                cls._spawn(
                    [
                        _binary("mooncake_master"),
                        f"--rpc_address={host}",
                        f"--rpc_port={rpc}",
                        "--enable_http_metadata_server=true",
                        f"--http_metadata_server_host={host}",
                        f"--http_metadata_server_port={http}",
                        f"--metrics_host={host}",
                        f"--metrics_port={metrics}",
                        f"--client_ttl={config.client_ttl}",
                        "--enable_metric_reporting=false",
                    ],
                    env,
                    Path(log_dir, "master.log"),
                )
            )
            master = procs[0]
            cls._wait(
                master,
                lambda: (
                    _http_ok(f"http://{host}:{metrics}/health", '"service_ready":true')
                    and _http_ok(f"http://{host}:{http}/health")
                    and port_open(host, rpc)
                ),
                config.startup_timeout,
                "mooncake_master",
                log_dir,
            )
            filled = replace(
                config,
                master_server_address=f"{host}:{rpc}",
                metadata_server=f"http://{host}:{http}/metadata",
            )
            if config.global_segment_size > 0:
                store_port = free_port()
                procs.append(
                    cls._spawn(
                        [
                            _binary("mooncake_client"),
                            f"--host={host}",
                            f"--port={store_port}",
                            f"--global_segment_size={config.global_segment_size}",
                            f"--master_server_address={filled.master_server_address}",
                            f"--metadata_server={filled.metadata_server}",
                            f"--protocol={config.protocol}",
                            f"--device_names={config.device_name}",
                        ],
                        env,
                        Path(log_dir, "store.log"),
                    )
                )
                cls._wait(
                    procs[1],
                    lambda: port_open(host, store_port),
                    config.startup_timeout,
                    "mooncake_client",
                    log_dir,
                )
                filled = replace(filled, store_address=f"{host}:{store_port}")
        except BaseException:
            for proc in reversed(procs):
                stop_pid(proc.pid)
                proc.wait(timeout=1)
            shutil.rmtree(log_dir, ignore_errors=True)
            raise
        return cls(filled, procs, log_dir)

    @staticmethod
    def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

    @staticmethod
    def _wait(proc: subprocess.Popen[bytes], ready: Any, timeout: float, what: str, log_dir: str) -> None:
        def exited() -> str | None:
            if proc.poll() is None:
                return None
            tail = Path(log_dir, "master.log" if "master" in what else "store.log").read_bytes()[-600:]
            return f"exited with code {proc.returncode}: {tail.decode('utf-8', 'replace')}"

        wait_until(ready, timeout, f"{what} (pid {proc.pid})", abort=exited)

    def alive(self) -> bool:
        """Whether the services answer (started ones: every process is still running)."""
        if self._procs:
            return all(pid_alive(p.pid) for p in self._procs)
        host, _, port = self.config.master_server_address.rpartition(":")
        return port.isdigit() and port_open(host or "127.0.0.1", int(port))

    def close(self) -> None:
        """Stop what :meth:`start` started, by pid (store process first); idempotent."""
        for proc in reversed(self._procs):
            stop_pid(proc.pid)
            proc.wait(timeout=5)
        self._procs = []
        if self._log_dir:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> MooncakeMaster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
