"""Which cluster and partition a loader's ``state_dict`` belongs to, checked on ``load_state_dict``.

A resume point is a batch index in the controller's round ledger; loaded into another cluster it
would silently skip or re-cut rows. ``state_dict()`` therefore records the cluster (the
controller's ``cluster_id`` when it has one, else the addresses of its controller and storage
units -- ephemeral ports differ for every embedded or Ray cluster) and, once rows were delivered,
the largest global index delivered. ``load_state_dict`` refuses (:class:`ResumeStateError`) when

* the cluster differs;
* rows were delivered but the partition does not exist here (cleared, or never produced);
* the largest delivered row id was never allocated here (row ids are never reused, so a cluster
  whose allocator has not reached it is a fresh one -- e.g. ``tq-loader serve`` restarted on the
  same fixed ports).

``load_state_dict(state, allow_other_cluster=True)`` warns instead and resumes anyway (e.g. after
restoring the cluster with ``tq.load_checkpoint`` into new processes).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from tq_loader._meta_util import warn_once
from tq_loader.errors import ResumeStateError, TQError
from tq_loader.loader.waiting import next_row_id

__all__ = ["ResumeStateError", "check_resume", "cluster_identity"]


def cluster_identity(client: Any) -> dict[str, Any]:
    """What identifies the cluster ``client`` talks to (plain data, JSON-able)."""
    info = client.describe()
    config = info.config if isinstance(info.config, Mapping) else {}
    cluster_id = getattr(info, "cluster_id", None) or config.get("cluster_id")
    return {
        "cluster_id": cluster_id,
        "controller": info.controller,
        "storage_units": sorted(info.storage_units),
    }


def _same_cluster(saved: Mapping[str, Any], here: Mapping[str, Any]) -> bool:
    if saved.get("cluster_id") and here.get("cluster_id"):
        return bool(saved["cluster_id"] == here["cluster_id"])
    return saved.get("controller") == here.get("controller") and list(saved.get("storage_units", [])) == list(
        here.get("storage_units", [])
    )


def check_resume(
    client: Any, state: Mapping[str, Any], here: Mapping[str, Any], *, allow_other_cluster: bool
) -> None:
    """Refuse (or, with ``allow_other_cluster``, warn about) a state from another cluster or partition."""
    saved = state.get("cluster")
    if saved is None:
        warn_once(
            ("StreamingDataLoader", "state without cluster"),
            "this loader state_dict records no cluster (saved by an older tq_loader), so resuming cannot "
            "check that it belongs to this cluster",
            stacklevel=4,
        )
        return
    problems = []
    if not _same_cluster(saved, here):
        problems.append(
            f"it was saved on another cluster ({_describe(saved)}; this one is {_describe(here)})"
        )
    else:
        problems += _partition_problems(client, state)
    if not problems:
        return
    message = (
        f"loader state for partition {state.get('partition_id')!r} task {state.get('task_name')!r} "
        f"(next batch {state.get('next_batch_index')}): " + "; ".join(problems)
    )
    if allow_other_cluster:
        warnings.warn(f"{message}; resuming anyway (allow_other_cluster=True)", UserWarning, stacklevel=3)
        return
    raise ResumeStateError(
        f"{message}. Resuming would skip or re-cut rows. Start a fresh loader for this cluster, or pass "
        "load_state_dict(state, allow_other_cluster=True) if this cluster really continues that stream "
        "(e.g. restored with tq.load_checkpoint)"
    )


def _partition_problems(client: Any, state: Mapping[str, Any]) -> list[str]:
    max_row = state.get("max_row_id")
    if max_row is None:
        return []  # nothing was delivered: nothing can be skipped
    pid = state.get("partition_id")
    try:
        known = set(client.get_partition_list())
        next_row = next_row_id(client)
    except (TQError, KeyError, TypeError, ValueError, AttributeError):
        return []
    problems = []
    if pid not in known:
        problems.append(f"rows of partition {pid!r} were delivered, but this cluster has no such partition")
    if int(max_row) >= next_row:
        problems.append(
            f"row {max_row} was delivered, but this cluster has allocated only rows below {next_row} "
            "(row ids are never reused: this is a fresh cluster)"
        )
    return problems


def _describe(ident: Mapping[str, Any]) -> str:
    if ident.get("cluster_id"):
        return f"cluster_id {ident['cluster_id']!r}"
    return f"controller {ident.get('controller')!r}, storage units {list(ident.get('storage_units', []))}"
