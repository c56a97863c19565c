"""The requests of :class:`~tq_loader.client_core.AsyncClient` that only ask the controller.

Production and consumption status, partition info, seal/abort, KV lookups and the controller's
state: one request each, no storage involved. A mixin so the client core stays about data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tq_loader import args
from tq_loader import protocol as p
from tq_loader.errors import ArgumentError, NotFoundError
from tq_loader.metadata import BatchMeta
from tq_loader.stats import PartitionStats

__all__ = ["ControllerQueries"]


class ControllerQueries:
    """Controller-only requests; the class using it provides ``_call(body) -> reply``."""

    async def _call(self, body: Any, **options: Any) -> Any:
        raise NotImplementedError

    async def async_create_partition(self, partition_id: str) -> None:
        await self._call(p.CreatePartition(partition_id=args.name("partition_id", partition_id)))

    async def async_get_partition_list(self) -> list[str]:
        reply: p.NamesReply = await self._call(p.ListPartitions())
        return list(reply.names)

    # ------------------------------------------------------------------ status
    async def async_get_production_status(
        self, data_fields: Sequence[str] | str, partition_id: str
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(global_indexes, status)``: status[i, j] is 1 when row i has field j (fields in given
        order); ``(None, None)`` for a partition that does not exist (yet), as in TransferQueue."""
        fields = args.names("data_fields", data_fields)
        req = p.ProductionStatus(partition_id=args.name("partition_id", partition_id), fields=fields)
        try:
            reply: p.StatusReply = await self._call(req)
        except NotFoundError:
            return None, None
        ids = p.ids_from_wire(reply.global_indexes)
        matrix = np.frombuffer(reply.matrix, dtype=bool).reshape(len(ids), len(reply.fields))
        return torch.from_numpy(ids), torch.from_numpy(matrix.astype(np.int8))

    async def async_check_production_status(
        self, data_fields: Sequence[str] | str, partition_id: str
    ) -> bool:
        """True when the partition has rows and every one has all ``data_fields`` (False if unknown)."""
        ids, status = await self.async_get_production_status(data_fields, partition_id)
        return bool(ids is not None and status is not None and len(ids) > 0 and status.all())

    async def async_get_consumption_status(
        self, task_name: str, partition_id: str
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(global_indexes, consumed)`` for every live row; ``(None, None)`` for an unknown partition."""
        req = p.ConsumptionStatus(
            partition_id=args.name("partition_id", partition_id), task_name=args.name("task_name", task_name)
        )
        try:
            reply: p.StatusReply = await self._call(req)
        except NotFoundError:
            return None, None
        ids = p.ids_from_wire(reply.global_indexes)
        consumed = np.frombuffer(reply.matrix, dtype=bool).astype(np.int8)
        return torch.from_numpy(ids), torch.from_numpy(consumed)

    async def async_check_consumption_status(self, task_name: str, partition_id: str) -> bool:
        """True when the partition has rows and ``task_name`` consumed all of them (False if unknown)."""
        ids, consumed = await self.async_get_consumption_status(task_name, partition_id)
        return bool(ids is not None and consumed is not None and len(ids) > 0 and consumed.all())

    async def async_reset_consumption(self, partition_id: str, task_name: str | None = None) -> bool:
        """Make every row of the partition unconsumed again (for ``task_name``, or every task); True."""
        await self._call(
            p.ResetConsumption(
                partition_id=args.name("partition_id", partition_id),
                task_name=args.optional_name("task_name", task_name),
            )
        )
        return True

    async def async_partition_info(self, partition_id: str) -> PartitionStats | None:
        """One partition's counters and flags (rows live/cleared, fields produced, tasks consumed,
        sealed, abandoned rows) without asking the storage; ``None`` for an unknown partition."""
        reply: p.PartitionInfoReply = await self._call(
            p.PartitionInfo(partition_id=args.name("partition_id", partition_id))
        )
        return reply.stats

    async def async_next_row_id(self) -> int:
        """The next global row id the controller hands out (ids are never reused)."""
        reply: p.PartitionInfoReply = await self._call(p.PartitionInfo())
        return reply.next_row_id

    # ------------------------------------------------------------------ streams
    async def async_seal(self, partition_id: str) -> None:
        """No new rows in ``partition_id``: consumers drain it and their streams end."""
        await self._call(p.Seal(partition_id=args.name("partition_id", partition_id)))

    async def async_abort(self, partition_id: str, reason: str = "aborted by producer") -> None:
        """Fail every waiting and later ``get_meta`` on ``partition_id`` with ``ClosedError(reason)``."""
        if not isinstance(reason, str):
            raise ArgumentError(f"reason must be a str, got {type(reason).__name__}")
        await self._call(p.Abort(partition_id=args.name("partition_id", partition_id), reason=reason))

    # ------------------------------------------------------------------ KV
    async def async_kv_retrieve_meta(
        self, keys: Sequence[str] | str, partition_id: str, create: bool = False, *, missing_ok: bool = False
    ) -> BatchMeta:
        """BatchMeta of the rows named by ``keys``, in key order (rows created for new keys if ``create``).

        Its fields are those every one of the rows has produced. Unknown keys -> ``NotFoundError``
        (or, with ``missing_ok``, they are left out).
        """
        meta, _ = await self.async_kv_lookup(keys, partition_id, create, missing_ok=missing_ok)
        return meta

    async def async_kv_lookup(
        self, keys: Sequence[str] | str, partition_id: str, create: bool = False, *, missing_ok: bool = False
    ) -> tuple[BatchMeta, np.ndarray]:
        """``kv_retrieve_meta`` plus a bool per row: True where this call created the key's row.

        The KV API needs to know which rows it created so that a failed write can remove them again.
        """
        keys = args.names("keys", keys, allow_empty=False)
        reply: p.KVLookupReply = await self._call(
            p.KVLookup(
                partition_id=args.name("partition_id", partition_id), keys=keys, create=args.flag("create", create),
                missing_ok=args.flag("missing_ok", missing_ok),
            )
        )  # fmt: skip
        meta = BatchMeta.from_wire(reply.meta)
        created = np.frombuffer(reply.created, dtype=bool).copy()
        if len(created) != meta.size:  # an empty reply (unknown partition, missing_ok) has none
            created = np.zeros(meta.size, dtype=bool)
        return meta, created

    async def async_kv_retrieve_keys(
        self, global_indexes: Sequence[int] | int, partition_id: str
    ) -> list[str]:
        """The keys of rows ``global_indexes``, in that order; ``NotFoundError`` for rows without one."""
        ids = [global_indexes] if isinstance(global_indexes, (int, np.integer)) else global_indexes
        if not isinstance(ids, (Sequence, np.ndarray)) or isinstance(ids, (str, bytes)):
            raise ArgumentError(f"global_indexes must be an int or a list of int, got {type(ids).__name__}")
        checked = [args.count(f"global_indexes[{i}]", v) for i, v in enumerate(ids)]
        if not checked:
            return []
        reply: p.NamesReply = await self._call(
            p.KVKeys(
                partition_id=args.name("partition_id", partition_id), global_indexes=p.ids_to_wire(checked)
            )
        )
        return list(reply.names)

    async def async_kv_list(self, partition_id: str | None = None) -> dict[str, dict[str, Any]]:
        reply: p.KVListReply = await self._call(
            p.KVList(partition_id=args.optional_name("partition_id", partition_id))
        )
        return dict(reply.partitions)

    # ------------------------------------------------------------------ checkpoints
    async def async_export_state(self) -> dict[str, Any]:
        """The controller's whole state as plain data (partitions, rows, consumption, keys, tags)."""
        reply: p.StateReply = await self._call(p.ExportState())
        return dict(reply.state)

    async def async_import_state(self, state: Mapping[str, Any], *, dry_run: bool = False) -> None:
        """Replace the controller's whole state with ``state`` (from ``export_state``); storage untouched.
        ``dry_run``: only let the controller validate it (it raises what a real import would)."""
        state = args.mapping("state", state)
        await self._call(p.ImportState(state=dict(state), dry_run=args.flag("dry_run", dry_run)))

    # ------------------------------------------------------------------ metrics
    async def async_announce_metrics(self, endpoint: str) -> None:
        """Tell the controller where the cluster's Prometheus endpoint is (``host:port``)."""
        await self._call(p.AnnounceMetrics(endpoint=args.name("endpoint", endpoint)))

    async def async_metrics_endpoint(self) -> str | None:
        """The announced Prometheus endpoint (``host:port``), or None when none was announced."""
        info: p.ClusterInfo = await self._call(p.Describe())
        return info.metrics_endpoint or None
