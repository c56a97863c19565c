"""openYuanrong datasystem as a :class:`~tq_loader.storage.kv_client.KVClient`, and its local worker.

Values live in the worker's shared memory (``shared_memory_size_mb``), so they outlive the
processes that wrote them. Writes use ``mcreate`` (the worker hands out shared-memory buffers) ->
fill -> ``mset_buffer``; :meth:`YuanrongKVClient.reserve` gives those buffers to the caller, so a
gather writes straight into worker memory. Reads use ``get_buffers``: read-only views of the
shared memory that stay valid while referenced, even after the key is overwritten or deleted
(``zero_copy_get``). Writes are not evictable (``WriteMode.NONE_L2_CACHE``): a full worker raises
:class:`CapacityError`.

Keys: Yuanrong accepts only ``[A-Za-z0-9-_!@#%^*()+=:;]`` and at most 255 characters, so other
characters are percent-encoded and over-long keys replaced by a digest (:func:`encode_key`).

:class:`YuanrongWorker` starts a local worker with its built-in metastore through ``dscli start``
on free loopback ports (~6 s) and stops it on :meth:`~YuanrongWorker.close` (``dscli stop``, then by
pid until the process is gone), or attaches to a running one.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from tq_loader.backend_config import YuanrongConfig
from tq_loader.errors import CapacityError, NotFoundError, SchemaError, TQConnectionError, TQError
from tq_loader.storage.kv_client import KVClient, free_port, pid_alive, port_open, stop_pid

__all__ = ["YuanrongConfig", "YuanrongKVClient", "YuanrongWorker", "encode_key", "yuanrong_available"]

_MAX_KEYS = 1000  # per mcreate / mset_buffer call (the worker refuses >= 2000)
_SAFE = re.compile(r"[A-Za-z0-9\-_!@#\^*()+=:;]")


def yuanrong_available() -> str | None:
    """None if the Yuanrong client can be used here, else what to install."""
    try:
        import yr.datasystem  # noqa: F401
    except ImportError as exc:
        return f"Yuanrong is not usable ({exc}); install it with `pip install openyuanrong-datasystem==0.8.1`"
    return None


def encode_key(key: str) -> str:
    """``key`` in Yuanrong's key alphabet: other characters (and ``%``) as ``%XX`` of their UTF-8."""
    out = "".join(ch if _SAFE.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode()) for ch in key)
    if len(out) > 255:
        out = "h:" + hashlib.sha256(key.encode()).hexdigest()
    return out


_CODE = re.compile(r"code: \[([^\]]*)\]")


def _error(exc: BaseException, what: str) -> TQError:
    """A Yuanrong ``RuntimeError`` ("code: [Key not found], msg: [...]") as our error type."""
    text = str(exc)
    match = _CODE.search(text)
    code = match.group(1) if match else ""
    short = text.split("\n", 1)[0][:300]
    if code == "Key not found":
        return NotFoundError(f"{what}: Yuanrong has no such key ({short})")
    if code == "Out of memory":
        return CapacityError(
            f"{what}: the Yuanrong worker is full; free rows (clear) or raise "
            f"storage.yuanrong.shared_memory_size_mb ({short})"
        )
    if code == "Invalid parameter":
        return SchemaError(f"{what}: {short}")
    if "RPC" in code or "connect" in text.lower() or "Try again" in code or "timeout" in code.lower():
        return TQConnectionError(f"{what}: the Yuanrong worker is unreachable ({short})")
    return TQError(f"{what}: {short}")


class YuanrongKVClient(KVClient):
    """A :class:`KVClient` over ``yr.datasystem.KVClient`` (same-host shared memory)."""

    name = "yuanrong"
    zero_copy_get = True
    zero_copy_put = True

    def __init__(self, config: YuanrongConfig) -> None:
        missing = yuanrong_available()
        if missing:
            raise TQConnectionError(missing)
        from yr.datasystem import KVClient as YrKVClient

        super().__init__()
        self.config = config
        host, _, port = config.worker_address.rpartition(":")
        if not port.isdigit():
            raise TQConnectionError(
                f"storage.yuanrong.worker_address must be host:port, got {config.worker_address!r}"
            )
        try:
            self._client = YrKVClient(
                host,
                int(port),
                connect_timeout_ms=int(config.connect_timeout * 1000),
                req_timeout_ms=int(config.request_timeout * 1000),
            )
            self._client.init()
        except RuntimeError as exc:
            raise TQConnectionError(
                f"cannot connect to the Yuanrong worker at {config.worker_address}: {str(exc)[:300]}"
            ) from None

    def services(self) -> dict[str, str]:
        return {"worker": self.config.worker_address}

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except RuntimeError as exc:
            raise _error(exc, what) from None

    # ------------------------------------------------------------------ hooks
    def _put(self, keys: list[str], values: list[memoryview]) -> None:
        done: list[str] = []
        try:
            for start in range(0, len(keys), _MAX_KEYS):
                part = slice(start, start + _MAX_KEYS)
                enc = [encode_key(k) for k in keys[part]]
                buffers = self._call("put", self._client.mcreate, enc, [v.nbytes for v in values[part]])
                for buf, value in zip(buffers, values[part]):
                    memoryview(buf.MutableData())[:] = value
                self._publish(enc, buffers)
                done += enc
        except BaseException:
            self._cleanup(done)
            raise

    def _publish(self, enc: list[str], buffers: list[Any]) -> None:
        try:
            self._call(f"put of {len(enc)} key(s)", self._client.mset_buffer, buffers)
        except BaseException:
            self._cleanup(enc)  # no half batch stays readable (see KVClient)
            raise

    def _cleanup(self, enc: list[str]) -> None:
        if enc:
            with contextlib.suppress(RuntimeError):  # worker gone: nothing of the batch is readable anyway
                self._client.delete(enc)

    def _reserve(self, keys: list[str], sizes: list[int]) -> Any:
        if len(keys) > _MAX_KEYS:
            raise SchemaError(
                f"reserve() takes at most {_MAX_KEYS} keys per call with Yuanrong, got {len(keys)}"
            )
        enc = [encode_key(k) for k in keys]
        buffers = self._call("reserve", self._client.mcreate, enc, sizes)
        views = [memoryview(b.MutableData()) for b in buffers]
        return views, lambda: self._publish(enc, buffers), lambda: None

    def _buffers(self, keys: list[str]) -> list[memoryview]:
        out: list[memoryview] = []
        for start in range(0, len(keys), _MAX_KEYS):
            part = keys[start : start + _MAX_KEYS]
            try:
                got = self._client.get_buffers([encode_key(k) for k in part], 0)
            except RuntimeError as exc:
                err = _error(exc, f"get of {len(part)} key(s)")
                if isinstance(err, NotFoundError):
                    raise NotFoundError(f"Yuanrong has no value for key(s) {part[:8]}") from None
                raise err from None
            missing = [k for k, b in zip(part, got) if b is None]
            if missing:
                raise NotFoundError(f"Yuanrong has no value for {len(missing)} key(s): {missing[:8]}")
            out += [memoryview(b) for b in got]
        return out

    def _get(self, keys: list[str]) -> list[memoryview]:
        return self._buffers(keys)

    def _get_into(self, keys: list[str], buffers: list[memoryview]) -> None:
        for key, src, dst in zip(keys, self._buffers(keys), buffers):
            if src.nbytes != dst.nbytes:
                raise SchemaError(f"key {key!r} holds {src.nbytes} bytes but its buffer has {dst.nbytes}")
            dst[:] = src

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _MAX_KEYS):
            failed = self._call(
                "delete", self._client.delete, [encode_key(k) for k in keys[start : start + _MAX_KEYS]]
            )
            if failed:
                raise TQError(f"Yuanrong could not delete {len(failed)} key(s) such as {failed[0]!r}")

    def _put_if_absent(self, key: str, value: memoryview) -> bool:
        from yr.datasystem.kv_client import ExistenceOpt, WriteMode

        try:
            self._client.msettx(
                [encode_key(key)], [bytes(value)], WriteMode.NONE_L2_CACHE, 0, ExistenceOpt.NX
            )
        except RuntimeError as exc:
            if "already exist" in str(exc):
                return False
            raise _error(exc, f"put of key {key!r}") from None
        return True

    def _exists(self, keys: list[str]) -> list[bool]:
        out: list[bool] = []
        for start in range(0, len(keys), _MAX_KEYS):
            part = [encode_key(k) for k in keys[start : start + _MAX_KEYS]]
            try:
                out += [bool(x) for x in self._call("exist", self._client.exist, part)]
            except NotFoundError:  # Yuanrong raises when none of them exists
                out += [False] * len(part)
        return out

    def _close(self) -> None:
        self._client = None


# --------------------------------------------------------------------------- local worker


def _dscli() -> list[str]:
    """The ``dscli`` command of the installed package (run by this interpreter: no PATH needed)."""
    script = Path(sys.executable).with_name("dscli")
    if script.is_file():
        return [str(script)]
    found = shutil.which("dscli")
    if not found:
        raise TQConnectionError("the Yuanrong `dscli` command is missing; reinstall openyuanrong-datasystem")
    return [found]


class YuanrongWorker:
    """A datasystem worker: started here (stopped on :meth:`close`) or attached to by address.

    :attr:`config` is the :class:`YuanrongConfig` with ``worker_address`` filled in.
    """

    def __init__(self, config: YuanrongConfig, pid: int | None, home: str | None, owns_home: bool) -> None:
        self.config = config
        self.pid = pid
        self._home = home
        self._owns_home = owns_home

    @classmethod
    def open(cls, config: YuanrongConfig | None = None) -> YuanrongWorker:
        """Attach when ``worker_address`` is set, else start a local worker (``auto_start``)."""
        config = config or YuanrongConfig()
        if config.worker_address:
            host, _, port = config.worker_address.rpartition(":")
            if not port.isdigit() or not port_open(host or "127.0.0.1", int(port), timeout=2.0):
                raise TQConnectionError(f"no Yuanrong worker answers at {config.worker_address!r}")
            return cls(config, None, None, False)
        if not config.auto_start:
            raise TQConnectionError(
                "storage.yuanrong.worker_address is empty and auto_start is off; "
                "give the address of a running worker or set auto_start: true"
            )
        return cls.start(config)

    @classmethod
    def start(cls, config: YuanrongConfig) -> YuanrongWorker:
        """``dscli start`` a worker with its own metastore on loopback; returns once it is ready."""
        missing = yuanrong_available()
        if missing:
            raise TQConnectionError(missing)
        owns_home = not config.home_dir
        home = tempfile.mkdtemp(prefix="tq_yuanrong_") if owns_home else config.home_dir
        worker = f"127.0.0.1:{config.worker_port or free_port()}"
        metastore = config.metastore_address or f"127.0.0.1:{config.metastore_port or free_port()}"
        cmd = [
            *_dscli(),
            "start",
            "-t",
            str(max(1, int(config.startup_timeout))),
            "-d",
            home,
            "-w",
            "--worker_address",
            worker,
            "--metastore_address",
            metastore,
            "--start_metastore_service",
            "true",
            "--arena_per_tenant",
            "1",
            "--shared_memory_size_mb",
            str(config.shared_memory_size_mb),
        ]
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=config.startup_timeout + 15,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            cls._forget(home, owns_home)
            raise TQConnectionError(
                f"`dscli start` did not return within {config.startup_timeout:.0f} s"
            ) from None
        text = done.stdout + done.stderr
        found = re.search(r"success, PID: (\d+)", text)
        if done.returncode != 0 or not found:
            pid = re.search(r"PID: (\d+)", text)
            if pid:
                stop_pid(int(pid.group(1)))
            cls._forget(home, owns_home)
            raise TQConnectionError(
                f"the Yuanrong worker did not start (dscli exit {done.returncode}): {text[-800:]}"
            )
        filled = replace(config, worker_address=worker, metastore_address=metastore)
        return cls(filled, int(found.group(1)), home, owns_home)

    @staticmethod
    def _forget(home: str, owns_home: bool) -> None:
        if owns_home:
            shutil.rmtree(home, ignore_errors=True)

    def alive(self) -> bool:
        if self.pid is not None:
            return pid_alive(self.pid)
        host, _, port = self.config.worker_address.rpartition(":")
        return port_open(host or "127.0.0.1", int(port))

    def close(self) -> None:
        """Stop a started worker (``dscli stop``, then by pid until gone); idempotent."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        if pid_alive(pid):
            with contextlib.suppress(subprocess.TimeoutExpired):  # then it is stopped by pid below
                subprocess.run(
                    [*_dscli(), "stop", "--worker_address", self.config.worker_address],
                    capture_output=True,
                    timeout=30,
                    stdin=subprocess.DEVNULL,
                )
        if not stop_pid(pid):
            raise TQConnectionError(f"the Yuanrong worker (pid {pid}) did not stop")
        if self._home:
            self._forget(self._home, self._owns_home)
            self._home = None

    def __enter__(self) -> YuanrongWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
