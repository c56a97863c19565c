"""The workloads and the one loop that drives them, shared by every system the suite measures.

Everything here imports only torch, tensordict and the standard library: the TransferQueue and
Ray drivers (``drivers/``) load this file by path in interpreters where tq_loader is not
installed, so that every system gets the same TensorDicts from the same seed and the same
sequence of calls (``kv_batch_put`` -> ``kv_batch_get`` -> ``kv_clear``, or ``kv_put`` /
single-key ``kv_batch_get`` for the small case). A fingerprint of the data travels with each
result, so a report can show that both sides really moved the same bytes.
"""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tensordict import NonTensorStack, TensorDict

__all__ = [
    "Workload",
    "build",
    "column_bytes",
    "drive_kv",
    "drive_small",
    "fingerprint",
    "payload_bytes",
    "same_data",
    "small_row",
    "timed",
]

Tick = Callable[[str], None]


@dataclass(frozen=True)
class Workload:
    """A batch shape. ``kind`` "batch": ``rows`` rows of ``regular`` float32 [width] fields, ``jagged``
    float32 fields with row lengths spread evenly over 1..width, and ``strings`` text fields of
    ``string_chars`` characters per row. ``kind`` "small": ``ops`` single-row puts of 4 small fields."""

    name: str
    rows: int = 1024
    regular: int = 9
    width: int = 8192
    jagged: int = 0
    strings: int = 0
    string_chars: int = 0
    kind: str = "batch"
    ops: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        return cls(**data)

    def describe(self) -> str:
        if self.kind == "small":
            return f"{self.ops} x single-row kv_put of 4 small fields, then single-key kv_batch_get"
        parts = [f"{self.regular} float32 [{self.width}]"] if self.regular else []
        if self.jagged:
            parts.append(f"{self.jagged} jagged float32 (lengths 1..{self.width})")
        if self.strings:
            parts.append(f"{self.strings} strings of {self.string_chars} chars")
        return f"{self.rows} rows x (" + " + ".join(parts) + ")"


def build(w: Workload) -> TensorDict:
    """The batch of ``w``, bit-for-bit the same in every interpreter with the same torch."""
    gen = torch.Generator().manual_seed(w.seed)
    td = TensorDict({}, batch_size=[w.rows])
    for i in range(w.regular):
        td.set(f"regular_{i}", torch.randn(w.rows, w.width, generator=gen))
    lengths = torch.linspace(1, w.width, w.rows).round().to(torch.int64).clamp(min=1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    for i in range(w.jagged):
        values = torch.randn(int(offsets[-1]), generator=gen)
        td.set(f"jagged_{i}", torch.nested.nested_tensor_from_jagged(values, offsets.clone()))
    for i in range(w.strings):
        raw = torch.randint(0, 256, (w.rows, w.string_chars // 2), generator=gen, dtype=torch.uint8)
        td.set(f"text_{i}", NonTensorStack.from_list([bytes(row.numpy()).hex() for row in raw]))
    return td


def small_row(i: int) -> dict[str, torch.Tensor]:
    """One sample of the small case: 4 fields, 116 bytes (built before any clock starts)."""
    gen = torch.Generator().manual_seed(i)
    return {
        "obs": torch.randn(16, generator=gen),
        "step": torch.tensor([i], dtype=torch.int64),
        "reward": torch.randn(4, generator=gen),
        "logp": torch.randn(8, generator=gen),
    }


def column_bytes(td: TensorDict) -> list[torch.Tensor]:
    """Every column as flat uint8 tensors: a dense field, a jagged field's values, a text field's
    characters (utf-8, joined). The bytes a raw transport or a memory copy moves for this batch."""
    out: list[torch.Tensor] = []
    for name in sorted(td.keys()):
        value = td.get(name)
        if isinstance(value, NonTensorStack):
            blob = "".join(value.tolist()).encode()
            out.append(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        else:
            data = value.values() if value.is_nested else value
            out.append(data.contiguous().view(-1).view(torch.uint8))
    return out


def payload_bytes(td: TensorDict) -> int:
    return sum(int(b.numel()) for b in column_bytes(td))


def fingerprint(td: TensorDict) -> str:
    """A short hash of every column's bytes (and jagged offsets), in field-name order."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(td.keys()):
        value = td.get(name)
        h.update(name.encode())
        if isinstance(value, NonTensorStack):
            for text in value.tolist():
                h.update(text.encode())
        else:
            data = value.values() if value.is_nested else value
            h.update(data.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            if value.is_nested:
                h.update(value.offsets().numpy().tobytes())
    return h.hexdigest()


def _flat(value: Any) -> torch.Tensor:
    # TransferQueue hands a single regular row back as a nested tensor: compare the values.
    return (value.values() if value.is_nested else value).reshape(-1)


def same_data(want: TensorDict | dict[str, Any], got: TensorDict) -> bool:
    """Whether ``got`` holds exactly the rows and fields of ``want``."""
    for name in want.keys():  # noqa: SIM118 -- iterating a TensorDict yields its rows
        a, b = want.get(name) if isinstance(want, TensorDict) else want[name], got.get(name)
        if isinstance(a, NonTensorStack):
            if list(b.tolist()) != list(a.tolist()):
                return False
        elif not torch.equal(_flat(a), _flat(b)):
            return False
    return True


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes, with the garbage collector held off (it would otherwise
    land in random rounds); the result is returned so that freeing it happens off the clock."""
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result
    finally:
        gc.enable()


def drive_kv(
    api: Any,
    w: Workload,
    td: TensorDict,
    reps: int,
    rounds: int,
    tick: Tick | None = None,
    view_get: Callable[[Sequence[str], str], Any] | None = None,
) -> dict[str, Any]:
    """``reps`` x ``rounds`` of put -> get -> clear through ``api`` (any module with TransferQueue's
    KV functions). One untimed warm-up round first checks that the data came back unchanged.
    Returns GB/s samples per operation, plus ``get_view`` when ``view_get`` (a copy=False read) is given."""
    keys = [f"{w.name}-{i}" for i in range(w.rows)]
    nbytes = payload_bytes(td)
    api.kv_batch_put(keys, f"{w.name}-warm", td)
    if not same_data(td, api.kv_batch_get(keys, f"{w.name}-warm")):
        raise AssertionError(f"{w.name}: the rows read back differ from the rows put")
    api.kv_clear(keys, f"{w.name}-warm")
    out: dict[str, list[float]] = {"put": [], "get": [], "clear_s": []}
    if view_get is not None:
        out["get_view"] = []
    for rep in range(reps):
        pid = f"{w.name}-rep{rep}"
        for _ in range(rounds):
            put_s, _ = timed(lambda pid=pid: api.kv_batch_put(keys, pid, td))
            get_s, got = timed(lambda pid=pid: api.kv_batch_get(keys, pid))
            del got
            if view_get is not None:
                view_s, view = timed(lambda pid=pid: view_get(keys, pid))
                del view
                out["get_view"].append(nbytes / view_s / 1e9)
            clear_s, _ = timed(lambda pid=pid: api.kv_clear(keys, pid))
            out["put"].append(nbytes / put_s / 1e9)
            out["get"].append(nbytes / get_s / 1e9)
            out["clear_s"].append(clear_s)
            if tick:
                tick(w.name)
        gc.collect()
    return {"samples": out, "bytes": nbytes, "fingerprint": fingerprint(td)}


def drive_small(api: Any, w: Workload, reps: int, rounds: int, tick: Tick | None = None) -> dict[str, Any]:
    """``w.ops`` single-row ``kv_put`` calls, then as many single-key ``kv_batch_get`` calls, per round;
    operations per second. A warm-up round checks the rows that come back."""
    rows = [small_row(i) for i in range(w.ops)]
    keys = [f"{w.name}-{i}" for i in range(w.ops)]
    warm = f"{w.name}-warm"
    for key, row in zip(keys[:8], rows[:8]):
        api.kv_put(key, warm, row)
    for key, row in zip(keys[:8], rows[:8]):
        if not same_data(row, api.kv_batch_get([key], warm)):
            raise AssertionError(f"{w.name}: a single row read back differs from the row put")
    api.kv_clear(keys[:8], warm)

    def puts(pid: str) -> None:
        for key, row in zip(keys, rows):
            api.kv_put(key, pid, row)

    def gets(pid: str) -> None:
        for key in keys:
            api.kv_batch_get([key], pid)

    out: dict[str, list[float]] = {"kv_put": [], "kv_batch_get": []}
    for rep in range(reps):
        pid = f"{w.name}-rep{rep}"
        for _ in range(rounds):
            put_s, _ = timed(lambda pid=pid: puts(pid))
            get_s, _ = timed(lambda pid=pid: gets(pid))
            api.kv_clear(keys, pid)
            out["kv_put"].append(w.ops / put_s)
            out["kv_batch_get"].append(w.ops / get_s)
            if tick:
                tick(w.name)
    return {"samples": out, "bytes": 0, "fingerprint": fingerprint(TensorDict(rows[0], batch_size=[]))}
