"""TransferQueue 0.1.11's configuration tree, read into tq_loader's.

TransferQueue users pass its ``config.yaml`` (or pieces of it) to ``init``. Every key of that file is
accepted: what has a tq_loader meaning is translated (``backend.SimpleStorage.num_data_storage_units``
-> ``storage.num_units``, ...), what tq_loader does itself is dropped quietly while it holds the
file's default (``zmq_info: null``), and what asks for something tq_loader does not do (SSD offload,
fixed ZMQ addresses) is dropped with one warning naming the key and what to use instead. The
per-backend sections (``backend.MooncakeStore``, ``backend.Yuanrong``, ``backend.RayStore``) are
handed back for the storage backends' own mapping. Torch-free: ``config`` imports it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

__all__ = ["BACKEND_NAMES", "split_transfer_queue_config", "warn_once"]

#: TransferQueue's ``backend.storage_backend`` values -> ``storage.backend``
BACKEND_NAMES = {
    "SimpleStorage": "simple",
    "MooncakeStore": "mooncake",
    "Yuanrong": "yuanrong",
    "RayStore": "ray_rdt",
}

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One warning per TransferQueue key that is accepted but has no effect here."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=5)


def _ignore(path: str, value: Any, default: Any, instead: str) -> None:
    """Drop ``path``; say so once when its value asks for more than tq_loader's own behaviour."""
    if value != default:
        warn_once(path, f"TransferQueue config key {path}={value!r} has no effect in tq_loader: {instead}")


def _controller(section: dict[str, Any]) -> None:
    _ignore(
        "controller.zmq_info",
        section.pop("zmq_info", None),
        None,
        "the controller picks its own port (set controller.port to fix one)",
    )
    sampler = section.get("sampler")
    if sampler is not None and not isinstance(sampler, str):
        # api.init has already taken a sampler object it can serve; what is left is named by its class
        section["sampler"] = getattr(sampler, "__name__", str(sampler))


def _simple_storage(section: dict[str, Any], storage: dict[str, Any], ray: dict[str, Any]) -> None:
    if section.get("num_data_storage_units") is not None:
        storage.setdefault("num_units", int(section["num_data_storage_units"]))
    total = section.get("total_storage_size")
    if total is not None:
        # TransferQueue bounds all units together; tq_loader bounds each unit (rows stripe evenly)
        units = int(storage.get("num_units", section.get("num_data_storage_units") or 2))
        storage.setdefault("capacity_rows", max(1, math.ceil(int(total) / max(units, 1))))
    if section.get("required_node_resource") is not None:
        ray.setdefault("unit_resource", str(section["required_node_resource"]))
    _ignore(
        "backend.SimpleStorage.zmq_info",
        section.get("zmq_info"),
        None,
        "storage units pick their own ports (set storage.ports to fix them)",
    )
    offload = section.get("ssd_offload") or {}
    if isinstance(offload, dict) and offload.get("enabled"):
        warn_once(
            "backend.SimpleStorage.ssd_offload",
            "TransferQueue config key backend.SimpleStorage.ssd_offload.enabled=True has no effect in "
            "tq_loader: rows stay in memory; bound it with storage.capacity_rows (a full unit makes "
            "puts wait up to storage.put_timeout) and free consumed rows with clear_samples/kv_clear",
        )


def split_transfer_queue_config(conf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Translate TransferQueue's keys in ``conf`` (a plain dict, changed in place) to tq_loader's.

    Returns ``(conf, backend_sections)``: ``backend_sections`` maps TransferQueue's per-backend
    section names (``MooncakeStore``, ``Yuanrong``, ``RayStore``) to their dicts, for the backend
    mapping. ``backend.storage_backend`` becomes ``storage.backend``.
    """
    controller = conf.get("controller")
    if isinstance(controller, dict):
        _controller(controller)
    backend = conf.pop("backend", None)
    sections: dict[str, Any] = {}
    if isinstance(backend, dict):
        had_ray = "ray" in conf
        storage, ray = conf.setdefault("storage", {}), conf.setdefault("ray", {})
        name = backend.pop("storage_backend", None)
        if name:
            storage.setdefault("backend", BACKEND_NAMES.get(str(name), str(name).lower()))
        simple = backend.pop("SimpleStorage", None)
        if isinstance(simple, dict):
            _simple_storage(simple, storage, ray)
        if not ray and not had_ray:
            del conf["ray"]
        # an empty section (``RayStore:`` in TransferQueue's file) is None: still a section
        sections = {key: value for key, value in backend.items() if value is None or isinstance(value, dict)}
        for key, value in backend.items():
            if key not in sections:
                warn_once(
                    f"backend.{key}",
                    f"TransferQueue config key backend.{key}={value!r} is not known to tq_loader and "
                    "has no effect (see docs/configuration.md for storage.*)",
                )
    return conf, sections
