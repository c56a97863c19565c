"""Wrong types for every public argument get a typed error naming the argument, at once.

The public API is enumerated with ``inspect.signature`` -- ``tq_loader.__all__``'s functions, the
sync client's constructor and public methods, ``BatchMeta``'s methods and the ``StreamingDataset`` /
``StreamingDataLoader`` constructors -- and for each parameter the call is made with a value of a
clearly wrong type (``object()``) and every other argument valid. Each must raise a ``TQError``
subclass whose message names the parameter, within ``BOUND_S`` (the wrong value must be caught
before anything waits: a server that cannot decode it, or a get_meta that waits for rows).

``VALID`` gives a valid call for every enumerated callable; a callable without an entry fails
``test_every_public_callable_is_covered``, so a new public function needs one. ``ANYTHING`` lists
the few parameters that deliberately accept any value, each with its reason.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import pytest
import torch

import tq_loader as tq
from tq_loader.client import Client
from tq_loader.metadata import BatchMeta

BOUND_S = 10.0  # far below every timeout of the calls (get_meta gets timeout=60 in VALID)
WRONG = object()

# parameter -> why any value is right there
ANYTHING: dict[str, str] = {
    "BatchMeta.set_extra_info.value": "extra_info holds arbitrary user values by design (TransferQueue's too)",
    "BatchMeta.get_extra_info.default": "returned as is when the key is missing, like dict.get",
    "StreamingDataset.config": "TransferQueue's cluster config (dict, DictConfig, TQConfig...): handed to tq.init on "
    "first use when no cluster is up, which checks it (see test_connect_and_init_refuse_wrong_types)",
    "StreamingDataLoader.multiprocessing_context": "torch's argument; it has no effect here (workers are threads) "
    "and is warned about once, whatever its value",
    "StreamingDataLoader.generator": "torch's argument; the loader draws no random numbers, so it has no effect "
    "and is warned about once, whatever its value",
}


# ---------------------------------------------------------------------------- the cluster and valid calls
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict[str, Any]]:
    tq.close()
    os.environ.pop("TQ_LOADER_ADDRESS", None)
    tq.init({"storage": {"num_units": 2}})
    client = tq.get_client()
    meta = client.put({"x": torch.arange(8.0).reshape(4, 2)}, partition_id="p")
    kv = tq.kv_batch_put(["k0", "k1"], "kv", {"x": torch.ones(2, 2)})
    ckpt = Path(tmp_path_factory.mktemp("ck")) / "ck"
    tq.save_checkpoint(ckpt)
    ds = tq.StreamingDataset(batch_size=2, data_fields=["x"], partition_id="p", task_name="loader")
    yield {
        "client": client,
        "meta": meta,
        "kv": kv,
        "ckpt": ckpt,
        "ds": ds,
        "address": client.controller_address,
    }
    tq.close()


def valid_calls(w: dict[str, Any]) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """``name -> (callable, valid keyword arguments)`` (parameters left out take their defaults)."""
    c, meta, kv = w["client"], w["meta"], w["kv"]
    x = {"x": torch.ones(1, 2)}
    fns: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
        "kv_batch_get": (tq.kv_batch_get, {"keys": ["k0"], "partition_id": "kv", "select_fields": ["x"]}),
        "kv_batch_get_by_meta": (tq.kv_batch_get_by_meta, {"meta": kv, "select_fields": ["x"]}),
        "kv_batch_put": (tq.kv_batch_put, {"keys": ["n0"], "partition_id": "kvw", "fields": x, "tags": [{"a": 1}]}),
        "kv_clear": (tq.kv_clear, {"keys": ["absent"], "partition_id": "kv"}),
        "kv_list": (tq.kv_list, {"partition_id": "kv"}),
        "kv_put": (tq.kv_put, {"key": "n1", "partition_id": "kv1", "fields": {"x": torch.ones(2)}, "tag": {"a": 1}}),
        "load_checkpoint": (tq.load_checkpoint, {"checkpoint_dir": w["ckpt"], "client": c}),
        "save_checkpoint": (tq.save_checkpoint, {"checkpoint_dir": w["ckpt"].with_name("ck2"), "metadata": {"e": 1}, "client": c}),
        "register_sampler": (tq.register_sampler, {"name": "bad-args-sampler", "cls": tq.SequentialSampler, "replace": True}),
        "init": (tq.init, {"conf": {"storage": {"num_units": 2}}}),
        "connect": (tq.connect, {"address": w["address"], "auth_token": None}),
    }  # fmt: skip
    for name in ("kv_batch_get", "kv_batch_get_by_meta", "kv_batch_put", "kv_clear", "kv_list", "kv_put",
                 "load_checkpoint", "save_checkpoint"):  # fmt: skip
        fns[f"async_{name}"] = (getattr(tq, f"async_{name}"), fns[name][1])
    fields = ["x"]
    kv_ids = c.kv_retrieve_meta(["k0"], "kv").global_index_array.tolist()
    client_calls = {
        "abort": {"partition_id": "aborted", "reason": "test"},
        "check_consumption_status": {"task_name": "t", "partition_id": "p"},
        "check_production_status": {"data_fields": fields, "partition_id": "p"},
        "clear_partition": {"partition_id": "scratch"},
        "clear_samples": {"metadata": c.put({"x": torch.ones(1, 2)}, partition_id="cleared")},
        "create_partition": {"partition_id": "created"},
        "get_consumption_status": {"task_name": "t", "partition_id": "p"},
        "get_data": {"metadata": meta, "device": "cpu", "copy": True},
        "get_meta": {
            "data_fields": fields, "batch_size": 2, "partition_id": "p", "mode": "fetch", "task_name": "bad-args",
            "sampling_config": {}, "timeout": 60.0, "allow_partial": True, "sampler": "sequential",
            "dp_rank": 0, "dp_size": 1, "batch_index": 0,
        },
        "get_production_status": {"data_fields": fields, "partition_id": "p"},
        "import_state": {"state": c.export_state(), "dry_run": True},
        "kv_list": {"partition_id": "kv"},
        "kv_lookup": {"keys": ["k0"], "partition_id": "kv", "create": False, "missing_ok": True},
        "kv_retrieve_keys": {"global_indexes": kv_ids, "partition_id": "kv"},
        "kv_retrieve_meta": {"keys": ["k0"], "partition_id": "kv", "create": False, "missing_ok": True},
        "kv_write": {"keys": ["w0"], "partition_id": "kvw", "data": x, "tags": [{"a": 1}]},
        "partition_info": {"partition_id": "p"},
        "put": {"data": x, "metadata": None, "partition_id": "p2"},
        "reset_consumption": {"partition_id": "p", "task_name": "t"},
        "run": {"fn": lambda core: core.async_get_partition_list()},
        "seal": {"partition_id": "sealed"},
        "set_custom_meta": {"metadata": meta},
        "set_tags": {"metadata": meta, "tags": [{"a": i} for i in range(4)]},
        "submit": {"fn": lambda core: core.async_get_partition_list()},
        "announce_metrics": {"endpoint": "127.0.0.1:9"},
    }  # fmt: skip
    for name, kwargs in client_calls.items():
        fns[f"Client.{name}"] = (getattr(c, name), kwargs)
    meta_calls = {
        "add_fields": {"tensor_dict": c.get_data(meta), "set_all_ready": True},
        "chunk": {"chunks": 2},
        "get_dtypes": {"field_name": "x"},
        "get_extra_info": {"key": "k", "default": None},
        "get_shapes": {"field_name": "x"},
        "has_extra_info": {"key": "k"},
        "remove_extra_info": {"key": "absent"},
        "reorder": {"indices": [3, 2, 1, 0]},
        "select_fields": {"field_names": ["x"]},
        "select_samples": {"sample_indices": [0, 1]},
        "set_extra_info": {"key": "k", "value": 1},
        "union": {"other": meta.copy()},
        "update_custom_meta": {"custom_meta": [{"n": i} for i in range(4)]},
        "update_extra_info": {"info_dict": {"k": 1}},
        "produced_with": {"schemas": dict(meta.field_schema)},
    }
    for name, kwargs in meta_calls.items():
        fns[f"BatchMeta.{name}"] = (getattr(meta.copy(), name), kwargs)  # a copy each: some mutate
    fns["Client"] = (Client, {"controller_address": w["address"], "config": None, "auth_token": None})
    fns["StreamingDataset"] = (
        tq.StreamingDataset,
        {
            "batch_size": 2, "micro_batch_size": 1, "data_fields": ["x"], "partition_id": "p", "task_name": "ds",
            "dp_rank": 0, "should_check_consumption_status": False, "dp_size": 1, "sampling_config": {},
            "drop_last": True, "timeout": 60.0, "copy": True, "start_batch_index": 0, "log_wait_after": 5.0,
        },
    )  # fmt: skip
    fns["StreamingDataLoader"] = (
        tq.StreamingDataLoader,
        {
            "dataset": w["ds"],
            "num_workers": 0,
            "pin_memory": False,
            "persistent_workers": False,
            "in_order": True,
        },
    )
    return fns


# parameters without a wrong *type*: nothing to check (no argument)
NO_ARGS = {"close", "get_client", "get_config", "get_metrics_endpoint", "is_initialized", "statistics"}
NO_ARGS |= {
    f"Client.{n}"
    for n in (
        "close",
        "describe",
        "export_state",
        "get_partition_list",
        "metrics_endpoint",
        "next_row_id",
        "statistics",
    )
}
NO_ARGS |= {f"BatchMeta.{n}" for n in ("chunk_by_partition", "clear_custom_meta", "clear_extra_info", "copy",
                                      "get_all_custom_meta", "get_all_extra_info", "to_struct", "to_wire")}  # fmt: skip
NOT_API = {"Client.async_*": "the async twins share the sync methods' checks (one implementation)"}


def public_callables() -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {}
    for name in tq.__all__:
        obj = getattr(
            tq, name, None
        )  # a name __all__ promises but lacks: test_every_public_callable_is_covered
        if inspect.isfunction(obj):
            out[name] = obj
    for name, fn in inspect.getmembers(Client, inspect.isfunction):
        if not name.startswith("_") and not name.startswith("async_"):
            out[f"Client.{name}"] = fn
    for name, fn in inspect.getmembers(BatchMeta, inspect.isfunction):
        if not name.startswith("_"):
            out[f"BatchMeta.{name}"] = fn
    out["Client"] = Client
    out["StreamingDataset"] = tq.StreamingDataset
    out["StreamingDataLoader"] = tq.StreamingDataLoader
    return out


def _params(fn: Callable[..., Any]) -> list[str]:
    sig = inspect.signature(fn)
    return [
        n for n, prm in sig.parameters.items()
        if n != "self" and prm.kind not in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD)
    ]  # fmt: skip


def _call_bounded(fn: Callable[..., Any], kwargs: dict[str, Any]) -> BaseException | None:
    """Call ``fn(**kwargs)`` in a thread; the exception it raised (None if it returned)."""
    fut: Future = Future()

    def main() -> None:
        try:
            out = fn(**kwargs)
            if inspect.iscoroutine(out):
                out = asyncio.run(out)
            if isinstance(out, Future):
                out = out.result(timeout=BOUND_S)
            fut.set_result(out)
        except BaseException as exc:  # handed to the test
            fut.set_exception(exc)

    import threading

    threading.Thread(target=main, daemon=True).start()
    try:
        fut.result(timeout=BOUND_S)
    except FutureTimeout:
        raise AssertionError(
            f"no error within {BOUND_S}s (the wrong value was not caught before a wait)"
        ) from None
    except BaseException as exc:
        return exc
    return None


def test_every_public_callable_is_covered(world) -> None:
    absent = [n for n in tq.__all__ if not hasattr(tq, n)]
    assert not absent, f"tq_loader.__all__ names what tq_loader lacks: {absent}"
    calls = valid_calls(world)
    missing = sorted(set(public_callables()) - set(calls) - NO_ARGS)
    assert not missing, f"add a valid call to VALID for {missing}"
    for name, fn in public_callables().items():
        if name in NO_ARGS:
            assert not _params(fn), f"{name} takes arguments now; give it a valid call"


def cases() -> list[str]:
    out = []
    for name, fn in public_callables().items():
        if name in NO_ARGS:
            continue
        out += [f"{name}.{p}" for p in _params(fn) if f"{name}.{p}" not in ANYTHING]
    return out


def test_valid_calls_are_valid(world) -> None:
    """The baseline: every valid call succeeds, so a failure below is the wrong argument's doing."""
    bad = {}
    calls = valid_calls(world)
    for name in sorted(calls, key=lambda n: "load_checkpoint" in n):  # loads replace the rows: last
        fn, kwargs = calls[name]
        if name in ("init", "connect"):
            continue  # they replace the module's cluster; test_connect_and_init cover them
        exc = _call_bounded(fn, kwargs)
        if exc is not None:
            bad[name] = repr(exc)[:300]
    assert not bad, "\n".join(f"{k}: {v}" for k, v in bad.items())


@pytest.mark.parametrize("case", cases())
def test_wrong_type_is_a_typed_error_naming_the_argument(world, case: str) -> None:
    name, param = case.rsplit(".", 1)
    if name in ("init", "connect"):
        pytest.skip("test_connect_and_init_refuse_wrong_types (they replace the module's cluster)")
    fn, kwargs = valid_calls(world)[name]
    exc = _call_bounded(fn, {**kwargs, param: WRONG})
    assert exc is not None, f"{case}=object() was accepted"
    assert isinstance(exc, tq.TQError), f"{case}: {type(exc).__name__}: {exc} (not a TQError)"
    assert param in str(exc), f"{case}: the message does not name {param!r}: {exc}"


def test_connect_and_init_refuse_wrong_types(world) -> None:
    """Runs last in this module: a wrong connect()/init() must fail by name and leave the cluster as is."""
    address = world["address"]
    for kwargs, param in (
        ({"address": WRONG}, "address"),
        ({"address": address, "auth_token": WRONG}, "auth_token"),
    ):
        exc = _call_bounded(tq.connect, kwargs)
        assert isinstance(exc, tq.TQError) and param in str(exc), repr(exc)
        assert tq.is_initialized(), f"connect({param}=object()) closed the current cluster"
    exc = _call_bounded(tq.init, {"conf": WRONG})
    assert isinstance(exc, tq.TQError) and "conf" in str(exc), repr(exc)
