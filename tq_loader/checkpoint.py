"""Checkpoints of a whole cluster: controller state plus the SimpleStorage rows, atomic, no pickle.

A checkpoint is a directory::

    manifest.json      format, version, and the sha256 + size of each file below (written last)
    state.msgpack      {"format", "version", "controller": the controller's exported state,
                        "metadata": the user's dict as one codec object blob}
    data.safetensors   chunk i = one field of one partition as one storage unit held it:
                       tensor "i.ids" (int64 row ids) and "i.0", "i.1", ... (uint8: the codec's
                       buffers of the column); header metadata "tq_loader.chunks" = JSON list of
                       [partition, ColumnSpec]

Saving writes into a temporary directory next to the target, fsyncs every file and the directory,
and only then renames it into place: an existing checkpoint is replaced only by a complete one.
(Between moving the old one aside and renaming the new one in there is a moment without a
checkpoint at the path; a crash right then leaves the old one as ``.<name>.tq-prev-*`` next to it,
and ``load_checkpoint`` says so.)

Loading reads and validates *everything* first -- checksums, msgpack and safetensors structure,
every column spec and buffer, that every stored row is a live row of its partition, and the
controller state (the controller itself validates it with a dry-run import) -- and raises
:class:`ProtocolError` / :class:`SchemaError` before the cluster is touched. Only then does it
clear the cluster's partitions, put the rows through the storage manager (re-striped over however
many units the cluster has now, without notifying the controller) and import the controller state
as saved. Nothing read is ever unpickled or executed.

Take checkpoints while producers and consumers are quiescent: the controller and the storage
units are read one after the other, not under one lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from tq_loader import args
from tq_loader.batch import PreparedBatch
from tq_loader.client import AsyncClient, Client
from tq_loader.codec import ColumnSpec, column_length, decode_columns, encode_columns
from tq_loader.codec_objects import decode_objects, encode_objects
from tq_loader.errors import (
    ArgumentError,
    CheckpointNotFoundError,
    ProtocolError,
    SchemaError,
    TQError,
)
from tq_loader.metadata import BatchMeta, schema_of
from tq_loader.schema import FieldSchema
from tq_loader.storage import SimpleStorageManager
from tq_loader.storage.columns import take_rows

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "async_load_checkpoint",
    "async_save_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "tq_loader.checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST, STATE_FILE, DATA_FILE = "manifest.json", "state.msgpack", "data.safetensors"
_CHUNKS_KEY = "tq_loader.chunks"
_HASH_BLOCK = 8 << 20
_HOST = socket.gethostname().replace("-", "_")

AnyClient = Client | AsyncClient


class _FileEntry(msgspec.Struct, frozen=True):
    sha256: str
    bytes: int


class _Manifest(msgspec.Struct, frozen=True):
    format: str
    version: int
    files: dict[str, _FileEntry]


class _StateFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    version: int
    controller: dict[str, Any]
    metadata: bytes


class _ChunkHeader(msgspec.Struct, frozen=True, array_like=True):
    partition: str
    spec: ColumnSpec


@dataclass
class _Chunk:
    """Rows ``ids`` of one field of one partition: encoded (save) or decoded (load)."""

    partition: str
    ids: np.ndarray
    name: str
    spec: ColumnSpec | None = None
    buffers: list[memoryview] | None = None
    value: Any = None


# --------------------------------------------------------------------------- public API


def save_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    *,
    include_storage: bool = True,
    client: AnyClient | None = None,
) -> str:
    """Write the cluster's controller state and stored rows to directory ``checkpoint_dir``; returns
    its path.

    ``metadata``: a dict of plain values (numbers, str, bytes, lists, dicts, numeric numpy arrays)
    returned by :func:`load_checkpoint`. ``include_storage=False`` is accepted for TransferQueue code
    but has no effect: the built-in storage is in memory, so its rows are always saved (a warning
    says so). ``client``: default ``tq_loader.api.get_client()``.
    """
    target = Path(args.path("checkpoint_dir", checkpoint_dir))
    _warn_include_storage(include_storage)
    packed = _pack_metadata(metadata)
    state, chunks = _run(_client(client), _collect)
    return str(_write_checkpoint(target, state, chunks, packed))


def load_checkpoint(
    checkpoint_dir: str | os.PathLike[str], *, client: AnyClient | None = None
) -> dict[str, Any]:
    """Replace the cluster's contents with checkpoint ``checkpoint_dir``; returns the saved ``metadata``.

    A missing checkpoint raises :class:`~tq_loader.errors.CheckpointNotFoundError` (a
    ``FileNotFoundError``); a damaged one ``ProtocolError`` -- in both cases before the cluster is touched.
    """
    source = Path(args.path("checkpoint_dir", checkpoint_dir))
    client = _client(client)  # checked before the checkpoint is read
    state, chunks, metadata = _read_checkpoint(source)
    _run(client, lambda core: _apply(core, state, chunks))
    return metadata


async def async_save_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    *,
    include_storage: bool = True,
    client: AnyClient | None = None,
) -> str:
    """:func:`save_checkpoint` for async code (file I/O on a worker thread)."""
    target = Path(args.path("checkpoint_dir", checkpoint_dir))
    _warn_include_storage(include_storage)
    packed = _pack_metadata(metadata)
    state, chunks = await _arun(_client(client), _collect)
    return str(await asyncio.to_thread(_write_checkpoint, target, state, chunks, packed))


async def async_load_checkpoint(
    checkpoint_dir: str | os.PathLike[str], *, client: AnyClient | None = None
) -> dict[str, Any]:
    """:func:`load_checkpoint` for async code (file I/O on a worker thread)."""
    source = Path(args.path("checkpoint_dir", checkpoint_dir))
    client = _client(client)  # checked before the checkpoint is read
    state, chunks, metadata = await asyncio.to_thread(_read_checkpoint, source)
    await _arun(client, lambda core: _apply(core, state, chunks))
    return metadata


def _warn_include_storage(include_storage: bool) -> None:
    if not args.flag("include_storage", include_storage):
        warnings.warn(
            "save_checkpoint(include_storage=False) has no effect with the built-in storage: its rows live "
            "in memory and are always saved (drop the argument to silence this)",
            UserWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- talking to the cluster


def _client(client: AnyClient | None) -> AnyClient:
    if client is not None:
        return args.instance("client", client, (Client, AsyncClient), "a tq_loader Client or AsyncClient")
    from tq_loader.api import get_client  # lazily: the top-level package imports both modules

    return get_client()


def _run(client: AnyClient, fn: Any) -> Any:
    """Run ``fn(async_client)`` on the sync client's loop (one hop for the whole operation)."""
    if isinstance(client, AsyncClient):
        raise ArgumentError("an AsyncClient belongs to an event loop: use async_save/async_load_checkpoint")
    return client.run(fn)


async def _arun(client: AnyClient, fn: Any) -> Any:
    if isinstance(client, AsyncClient):
        return await fn(client)
    return await asyncio.wrap_future(client.submit(fn))


async def _simple_storage(core: AsyncClient) -> SimpleStorageManager:
    storage = await core.storage()
    if not isinstance(storage, SimpleStorageManager):
        raise TQError(
            f"checkpoints cover the built-in storage (storage.backend=simple), not {type(storage).__name__}; "
            "checkpoint an external backend with its own tools"
        )
    return storage


async def _collect(core: AsyncClient) -> tuple[dict[str, Any], list[_Chunk]]:
    """The controller state, then every live stored row as encoded chunks (one per unit and field)."""
    storage = await _simple_storage(core)
    state = await core.async_export_state()
    chunks: list[_Chunk] = []
    for part in state["partitions"]:
        pid = part["partition_id"]
        live = np.frombuffer(part["ids"]["data"], dtype="<i8")
        for _, fields in await storage.export_partition(pid):
            for name, (ids, value) in fields.items():
                keep = np.isin(ids, live)  # rows cleared in the controller but not yet in storage
                if not keep.all():
                    ids, value = ids[keep], take_rows(value, np.flatnonzero(keep))
                if ids.size:
                    specs, buffers = encode_columns({name: value})
                    chunks.append(_Chunk(pid, ids, name, specs[0], buffers))
    return state, chunks


async def _apply(core: AsyncClient, state: dict[str, Any], chunks: list[_Chunk]) -> None:
    """Clear the cluster, store the rows (re-striped, no notify), then import the controller state."""
    storage = await _simple_storage(core)
    await core.async_import_state(state, dry_run=True)  # the controller validates it before any change
    for pid in await core.async_get_partition_list():
        await core.async_clear_partition(pid)
    for pid in dict.fromkeys(c.partition for c in chunks):  # rows a unit holds without the controller
        await storage.clear_partition(pid)
    schemas = {p["partition_id"]: p["schemas"] for p in state["partitions"]}
    groups: dict[tuple[str, bytes], list[_Chunk]] = {}
    for chunk in chunks:  # fields stored for the same rows go in one put
        groups.setdefault((chunk.partition, chunk.ids.tobytes()), []).append(chunk)
    for (pid, _), group in groups.items():
        ids = group[0].ids
        known = {
            c.name: msgspec.convert(schemas[pid][c.name], FieldSchema)
            for c in group
            if c.name in schemas[pid]
        }
        columns = {c.name: c.value for c in group}
        put = {name: known[name] if name in known else schema_of(v, name) for name, v in columns.items()}
        await storage.put_data(PreparedBatch(ids.size, columns, put), BatchMeta(ids, pid))
    await core.async_import_state(state)


# --------------------------------------------------------------------------- writing


def _pack_metadata(metadata: Mapping[str, Any] | None) -> bytes:
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise SchemaError("checkpoint metadata must be a dict with str keys (of plain values)")
    return encode_objects([dict(metadata)], "checkpoint metadata")


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _write_data_file(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=header)


def _digest(path: Path, *, fsync: bool = False) -> _FileEntry:
    """Checksum and size of the bytes in ``path`` (after an fsync when writing)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return _FileEntry(digest.hexdigest(), size)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened (nor need fsync) there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _data_tensors(chunks: list[_Chunk]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    headers = []
    for i, chunk in enumerate(chunks):
        assert chunk.spec is not None and chunk.buffers is not None
        headers.append(_ChunkHeader(chunk.partition, chunk.spec))
        tensors[f"{i}.ids"] = torch.from_numpy(np.ascontiguousarray(chunk.ids, dtype=np.int64))
        for j, buf in enumerate(chunk.buffers):
            tensors[f"{i}.{j}"] = (
                torch.frombuffer(buf, dtype=torch.uint8) if buf.nbytes else torch.empty(0, dtype=torch.uint8)
            )
    return tensors, {_CHUNKS_KEY: msgspec.json.encode(headers).decode()}


def _check_replaceable(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise TQError(f"checkpoint path {target} exists and is not a directory; pick another path")
    if target.is_dir() and not (target / MANIFEST).is_file() and any(target.iterdir()):
        raise TQError(
            f"{target} is a non-empty directory that is not a tq_loader checkpoint; refusing to replace "
            "it -- pick another path or remove it"
        )


def _write_checkpoint(target: Path, state: dict[str, Any], chunks: list[_Chunk], metadata: bytes) -> Path:
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    _check_replaceable(target)
    tmp = target.with_name(f".{target.name}.tq-tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()  # not mkdtemp: the checkpoint keeps the umask's permissions, not 0700
    try:
        blob = msgspec.msgpack.encode(_StateFile(CHECKPOINT_FORMAT, CHECKPOINT_VERSION, state, metadata))
        _write_bytes(tmp / STATE_FILE, blob)
        _write_data_file(tmp / DATA_FILE, *_data_tensors(chunks))
        files = {name: _digest(tmp / name, fsync=True) for name in (STATE_FILE, DATA_FILE)}
        manifest = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "created_unix": time.time(),
            "files": msgspec.to_builtins(files), "partitions": [p["partition_id"] for p in state["partitions"]],
            "chunks": len(chunks),
        }  # fmt: skip
        _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _digest(tmp / MANIFEST, fsync=True)
        _fsync_dir(tmp)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _owner_alive(path: Path) -> bool:
    """Whether the save that made ``path`` (``...-<host>-<pid>-<id>``) may still be running."""
    parts = path.name.rsplit("-", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return False  # not a name this version writes: a leftover
    if parts[1] != _HOST:
        return True  # another host's save (a shared filesystem): never touch it
    pid = int(parts[2])
    if pid == os.getpid():
        return True  # a save of this process, maybe on another thread
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove what saves killed midway left beside ``target``: temporary directories of dead savers,
    and a previous checkpoint kept aside (restored first if the save died before the new one was in
    place). Returns what was removed or restored."""
    target = target.absolute()
    done: list[Path] = []
    if not target.parent.is_dir():
        return done
    for leftover in sorted(target.parent.glob(f".{target.name}.tq-prev-*")):
        if _owner_alive(leftover):
            continue
        if not target.exists():
            os.rename(leftover, target)  # the old checkpoint was moved aside and the new one never came
        else:
            shutil.rmtree(leftover, ignore_errors=True)
        done.append(leftover)
    for leftover in target.parent.glob(f".{target.name}.tq-tmp-*"):
        if not _owner_alive(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(leftover)
    return done


def _replace(tmp: Path, target: Path) -> None:
    """Rename the complete ``tmp`` to ``target``; an old checkpoint there is removed only afterwards."""
    prev = None
    if target.exists():
        prev = target.with_name(f".{target.name}.tq-prev-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(target, prev)
    try:
        os.rename(tmp, target)
    except BaseException:
        if prev is not None:
            os.rename(prev, target)
        raise
    _fsync_dir(target.parent)
    if prev is not None:
        shutil.rmtree(prev)


# --------------------------------------------------------------------------- reading


def _corrupt(target: Path, what: str) -> ProtocolError:
    return ProtocolError(f"checkpoint {target}: {what}; the checkpoint is corrupt or was modified")


def _read_manifest(target: Path) -> _Manifest:
    if not (target / MANIFEST).is_file():
        what = "does not exist" if not target.exists() else f"has no {MANIFEST}"
        raise CheckpointNotFoundError(
            f"no checkpoint at {target} ({what}); save one with tq.save_checkpoint()"
        )
    try:
        manifest = msgspec.json.decode((target / MANIFEST).read_bytes(), type=_Manifest)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise _corrupt(target, f"malformed {MANIFEST} ({exc})") from None
    if manifest.format != CHECKPOINT_FORMAT or manifest.version != CHECKPOINT_VERSION:
        raise ProtocolError(
            f"checkpoint {target} has format {manifest.format!r} version {manifest.version}; this tq_loader "
            f"reads {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}"
        )
    for name in (STATE_FILE, DATA_FILE):
        entry = manifest.files.get(name)
        if entry is None or not (target / name).is_file():
            raise _corrupt(target, f"{name} is missing")
        if _digest(target / name) != entry:
            raise _corrupt(target, f"{name} does not match its checksum in {MANIFEST}")
    return manifest


def _read_state(target: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    try:
        sf = msgspec.msgpack.decode((target / STATE_FILE).read_bytes(), type=_StateFile)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise _corrupt(target, f"malformed {STATE_FILE} ({exc})") from None
    if sf.format != CHECKPOINT_FORMAT or sf.version != CHECKPOINT_VERSION:
        raise _corrupt(target, f"{STATE_FILE} has format {sf.format!r} version {sf.version}")
    metadata = decode_objects(memoryview(sf.metadata), 1, "checkpoint metadata")[0]
    if not isinstance(metadata, dict):
        raise _corrupt(target, "metadata is not a dict")
    return sf.controller, _live_ids(target, sf.controller), metadata


def _live_ids(target: Path, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each partition's live row ids as the state lists them (the controller checks the rest)."""
    try:
        return {
            str(part["partition_id"]): np.frombuffer(part["ids"]["data"], dtype="<i8")
            for part in state["partitions"]
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(target, f"{STATE_FILE} lists its partitions malformed ({exc!r})") from None


def _read_chunks(target: Path, live: dict[str, np.ndarray]) -> list[_Chunk]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(target / DATA_FILE), framework="pt") as f:
            header = (f.metadata() or {}).get(_CHUNKS_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        headers = msgspec.json.decode(header or "", type=list[_ChunkHeader])
    except (SafetensorError, msgspec.DecodeError, msgspec.ValidationError, RecursionError, OSError) as exc:
        raise _corrupt(target, f"malformed {DATA_FILE} ({exc})") from None
    if any(not 1 <= h.spec.nbuf <= 2 for h in headers) or set(tensors) != {
        f"{i}.{j}" for i, h in enumerate(headers) for j in ["ids", *range(h.spec.nbuf)]
    }:
        raise _corrupt(target, f"{DATA_FILE} tensors do not match its chunk list")
    chunks = []
    for i, h in enumerate(headers):
        ids_t, bufs = tensors[f"{i}.ids"], [tensors[f"{i}.{j}"] for j in range(h.spec.nbuf)]
        if (
            ids_t.dtype != torch.int64
            or ids_t.dim() != 1
            or any(b.dtype != torch.uint8 or b.dim() != 1 for b in bufs)
        ):
            raise _corrupt(target, f"chunk {i} has tensors of the wrong dtype or rank")
        value = decode_columns([h.spec], [memoryview(b.numpy()) for b in bufs], copy=False)[h.spec.name]
        ids = ids_t.numpy()
        if column_length(value) != ids.size or np.unique(ids).size != ids.size:
            raise _corrupt(target, f"chunk {i} ({h.partition!r}, {h.spec.name!r}) has mismatched row ids")
        rows = live.get(h.partition)
        if rows is None or not np.isin(ids, rows).all():  # every stored row is a live row of its partition
            raise _corrupt(target, f"chunk {i}: rows of {h.partition!r} that its saved state does not hold")
        chunks.append(_Chunk(h.partition, ids, h.spec.name, value=value))
    return chunks


def _read_checkpoint(target: Path) -> tuple[dict[str, Any], list[_Chunk], dict[str, Any]]:
    """Everything a load needs, fully validated before any cluster is touched."""
    target = target.absolute()
    clean_stale(target)
    _read_manifest(target)
    state, live, metadata = _read_state(target)
    return state, _read_chunks(target, live), metadata
