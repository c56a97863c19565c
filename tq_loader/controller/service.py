"""The controller service: serves :mod:`tq_loader.controller.state` over the transport.

Readiness is decided here and only here: storage managers send ``NotifyProduced`` after every unit
acknowledged a write, and ``get_meta`` hands out rows that are produced and not yet consumed.

Waiting is server-side: a ``get_meta`` that cannot be served yet parks on the partition's change
event (no client polling) until enough rows are ready, the partition is sealed and drained, it is
aborted, or the request's deadline passes. Nothing is consumed for a request whose deadline passed.

Rank-aware requests (``dp_rank`` and ``batch_index`` given) are served from *rounds*: the first
caller of a batch index samples ``batch_size x dp_size`` rows with the configured sampler, splits
them over the data-parallel ranks and records the round in the ledger. Every caller with the same
(partition, task, batch index) -- TP/PP ranks of one DP group, a resumed loader -- gets the same
rows; different DP ranks get disjoint rows; all DP ranks see the same number of batches.

A producer that dies between allocating rows (an insert ``PrepareWrite``) and notifying leaves rows
that will never be produced. Once a partition is sealed they may not hold back its end: a timer on
the event loop (no polling) fires ``controller.seal_grace_s`` after the seal and drops the rows that
still have no produced field (``abandoned_rows`` in statistics); waiting consumers are then served
what is complete, then end-of-stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from tq_loader import protocol as p
from tq_loader.config import ControllerConfig
from tq_loader.controller.registry import ControllerState
from tq_loader.controller.state import PartitionState
from tq_loader.errors import ClosedError, NotFoundError, ProtocolError, SchemaError, TQTimeoutError
from tq_loader.metadata import BatchMeta
from tq_loader.samplers import BaseSampler, SeqlenBalancedSampler, make_sampler
from tq_loader.samplers.rounds import Round, RoundLedger
from tq_loader.stats import ControllerStats
from tq_loader.transport import RequestContext

__all__ = ["ControllerService"]

log = logging.getLogger(__name__)

DEFAULT_TASK = "__default__"
_MODES = ("insert", "fetch", "force_fetch")
_RESERVED = ("dp_rank", "dp_size", "batch_index", "allow_partial", "task_name", "partition_id")


class ControllerService:
    """Handler for the controller's ROUTER server (runs on one event loop; no locks needed)."""

    def __init__(self, config: ControllerConfig | None = None) -> None:
        self.config = config or ControllerConfig()
        self.state = ControllerState()
        self.ledger = RoundLedger(self.config.round_cache)
        self.cluster: p.ClusterInfo | None = None
        self._changed: dict[str, asyncio.Event] = {}
        self._samplers: dict[str, BaseSampler] = {}
        self._waiting = 0
        self._served = {
            "get_meta": 0, "rows_out": 0, "eos": 0, "timeouts": 0, "notifies": 0, "lost_rows": 0,
            "abandoned_rows": 0,
        }  # fmt: skip
        self.lost_units: dict[int, str] = {}
        self._grace_timers: dict[str, asyncio.TimerHandle] = {}  # sealed partition -> abandonment timer
        self._dispatch: dict[type, Callable[..., Any]] = {
            p.Describe: self._describe,
            p.AnnounceMetrics: self._announce_metrics,
            p.CreatePartition: self._create_partition,
            p.ListPartitions: self._list_partitions,
            p.GetMeta: self._get_meta,
            p.PrepareWrite: self._prepare_write,
            p.NotifyProduced: self._notify_produced,
            p.SetTags: self._set_tags,
            p.ClearSamples: self._clear_samples,
            p.ClearPartition: self._clear_partition,
            p.ResetConsumption: self._reset_consumption,
            p.ProductionStatus: self._production_status,
            p.ConsumptionStatus: self._consumption_status,
            p.KVLookup: self._kv_lookup,
            p.KVList: self._kv_list,
            p.KVKeys: self._kv_keys,
            p.Seal: self._seal,
            p.Abort: self._abort,
            p.Stats: self._stats,
            p.PartitionInfo: self._partition_info,
            p.ReportLost: self._report_lost,
            p.ExportState: self._export_state,
            p.ImportState: self._import_state,
        }

    async def handle(self, ctx: RequestContext, request: p.Request, buffers: list[memoryview]) -> Any:
        method = self._dispatch.get(type(request))
        if method is None:
            raise ProtocolError(
                f"the controller does not serve {type(request).__name__}; send it to a storage unit"
            )
        reply = method(ctx, request)
        if asyncio.iscoroutine(reply):
            reply = await reply
        return reply, ()

    # ------------------------------------------------------------------ change notification
    def _notify(self, partition_id: str) -> None:
        event = self._changed.pop(partition_id, None)
        if event is not None:
            event.set()

    def _event(self, partition_id: str) -> asyncio.Event:
        event = self._changed.get(partition_id)
        if event is None:
            event = self._changed[partition_id] = asyncio.Event()
        return event

    # ------------------------------------------------------------------ simple requests
    def _describe(self, ctx: RequestContext, req: p.Describe) -> p.ClusterInfo:
        if self.cluster is None:
            raise NotFoundError("the controller has no cluster description yet; the cluster is starting")
        return self.cluster

    def _announce_metrics(self, ctx: RequestContext, req: p.AnnounceMetrics) -> p.Ok:
        if self.cluster is None:
            raise NotFoundError("the controller has no cluster description yet; the cluster is starting")
        self.cluster = msgspec.structs.replace(self.cluster, metrics_endpoint=req.endpoint)
        return p.Ok()

    def _create_partition(self, ctx: RequestContext, req: p.CreatePartition) -> p.Ok:
        self.state.get_or_create(req.partition_id)
        return p.Ok()

    def _list_partitions(self, ctx: RequestContext, req: p.ListPartitions) -> p.NamesReply:
        return p.NamesReply(names=self.state.list())

    def _prepare_write(self, ctx: RequestContext, req: p.PrepareWrite) -> p.WriteReply:
        part = self.state.get_or_create(req.partition_id) if req.insert else self.state.get(req.partition_id)
        merged = part.check_schemas(req.schemas, cast=True)
        if req.insert:
            ids = part.insert(req.new_rows)
        else:
            ids = p.ids_from_wire(req.global_indexes)
            part.positions(ids)  # unknown or cleared rows -> NotFoundError before any byte is stored
        return p.WriteReply(global_indexes=p.ids_to_wire(ids), schemas=merged)

    def _notify_produced(self, ctx: RequestContext, req: p.NotifyProduced) -> p.Ok:
        part = self.state.get(req.partition_id)
        ids = p.ids_from_wire(req.global_indexes)
        if req.tags is not None and len(req.tags) != len(ids):
            raise SchemaError(f"{len(req.tags)} tags for {len(ids)} rows; give one tag dict per row")
        part.mark_produced(ids, req.schemas)
        if req.tags is not None:
            part.set_tags(ids, req.tags)
        self._served["notifies"] += 1
        self._notify(req.partition_id)
        return p.Ok()

    def _set_tags(self, ctx: RequestContext, req: p.SetTags) -> p.Ok:
        ids = p.ids_from_wire(req.global_indexes)
        if len(req.tags) != len(ids):
            raise SchemaError(f"{len(req.tags)} tags for {len(ids)} rows; give one tag dict per row")
        self.state.get(req.partition_id).set_tags(ids, req.tags)
        self._notify(req.partition_id)
        return p.Ok()

    def _clear_samples(self, ctx: RequestContext, req: p.ClearSamples) -> p.IdsReply:
        cleared = self.state.get(req.partition_id).clear(p.ids_from_wire(req.global_indexes))
        self._notify(req.partition_id)
        return p.IdsReply(global_indexes=p.ids_to_wire(cleared))

    def _clear_partition(self, ctx: RequestContext, req: p.ClearPartition) -> p.Ok:
        self._cancel_grace(req.partition_id)
        self.state.drop(req.partition_id, missing_ok=True)
        self.ledger.drop_partition(req.partition_id)
        for sampler in self._samplers.values():
            sampler.clear_cache(req.partition_id)
        self._notify(req.partition_id)
        return p.Ok()

    def _reset_consumption(self, ctx: RequestContext, req: p.ResetConsumption) -> p.Ok:
        self.state.get(req.partition_id).reset_consumption(req.task_name)
        if req.task_name is None:
            self.ledger.drop_partition(req.partition_id)
        else:
            self.ledger.drop((req.partition_id, req.task_name))
        self._notify(req.partition_id)
        return p.Ok()

    def _production_status(self, ctx: RequestContext, req: p.ProductionStatus) -> p.StatusReply:
        ids = None if req.global_indexes is None else p.ids_from_wire(req.global_indexes)
        out_ids, fields, matrix = self.state.get(req.partition_id).production_status(ids, req.fields)
        return p.StatusReply(
            global_indexes=p.ids_to_wire(out_ids),
            fields=list(fields),
            matrix=np.asarray(matrix, bool).tobytes(),
        )

    def _consumption_status(self, ctx: RequestContext, req: p.ConsumptionStatus) -> p.StatusReply:
        ids = None if req.global_indexes is None else p.ids_from_wire(req.global_indexes)
        out_ids, consumed = self.state.get(req.partition_id).consumption_status(req.task_name, ids)
        return p.StatusReply(
            global_indexes=p.ids_to_wire(out_ids), fields=[], matrix=np.asarray(consumed, bool).tobytes()
        )

    def _kv_lookup(self, ctx: RequestContext, req: p.KVLookup) -> p.KVLookupReply:
        merged: dict[str, Any] = {}
        if req.create:
            part = self.state.get_or_create(req.partition_id)
            if req.schemas is not None:  # before any key is created: a conflict changes nothing
                merged = part.check_schemas(req.schemas, cast=True)
            ids, created = part.get_or_create_keys(req.keys)
        elif req.missing_ok and req.partition_id not in self.state:
            return p.KVLookupReply(meta=BatchMeta.empty().to_struct(), created=b"")
        else:
            part = self.state.get(req.partition_id)
            ids = part.lookup_keys(req.keys)
            created = np.zeros(len(ids), bool)
            if req.missing_ok:
                ids, created = ids[ids >= 0], created[ids >= 0]
            elif (ids < 0).any():
                missing = [k for k, i in zip(req.keys, ids.tolist()) if i < 0]
                shown = ", ".join(repr(k) for k in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise NotFoundError(
                    f"partition {req.partition_id!r} has no keys {shown}{more}; put them first (kv_put)"
                )
        _, fields, matrix = part.production_status(ids, None)
        common = [f for j, f in enumerate(fields) if len(ids) and matrix[:, j].all()]
        meta = self._meta(part, ids, common)
        meta.set_extra_info("keys", part.keys_of(ids))
        if req.schemas is not None and not req.create:
            merged = part.check_schemas(req.schemas, cast=True)
        return p.KVLookupReply(
            meta=meta.to_struct(), created=np.asarray(created, bool).tobytes(),
            schemas={name: merged[name] for name in (req.schemas or {})},
        )  # fmt: skip

    def _kv_keys(self, ctx: RequestContext, req: p.KVKeys) -> p.NamesReply:
        ids = p.ids_from_wire(req.global_indexes)
        keys = self.state.get(req.partition_id).keys_of(ids)
        missing = [int(i) for i, k in zip(ids.tolist(), keys) if k is None]
        if missing:
            raise NotFoundError(
                f"partition {req.partition_id!r}: rows {missing[:5]} have no key (they were put without one)"
            )
        return p.NamesReply(names=[k for k in keys if k is not None])

    def _kv_list(self, ctx: RequestContext, req: p.KVList) -> p.KVListReply:
        pids = self.state.list() if req.partition_id is None else [req.partition_id]
        pids = [pid for pid in pids if pid in self.state]  # an unknown partition lists as empty
        out: dict[str, dict[str, Any]] = {}
        for pid in pids:
            part = self.state.get(pid)
            keys, ids = part.list_keys()
            out[pid] = dict(zip(keys, part.get_tags(ids)))
        return p.KVListReply(partitions=out)

    def _seal(self, ctx: RequestContext, req: p.Seal) -> p.Ok:
        part = self.state.get_or_create(req.partition_id)
        if not part.sealed:  # the grace period runs from the first seal
            part.seal()
            self._start_grace(ctx.loop, part)
        self._notify(req.partition_id)
        return p.Ok()

    # ------------------------------------------------------------------ abandoned rows
    def _start_grace(self, loop: asyncio.AbstractEventLoop, part: PartitionState) -> None:
        """Drop ``part``'s never-produced rows ``seal_grace_s`` from now (sealed: no new rows come)."""
        pid = part.partition_id
        self._cancel_grace(pid)
        if part.unproduced().size:
            self._grace_timers[pid] = loop.call_later(self.config.seal_grace_s, self._drop_abandoned, part)

    def _cancel_grace(self, partition_id: str) -> None:
        timer = self._grace_timers.pop(partition_id, None)
        if timer is not None:
            timer.cancel()

    def _drop_abandoned(self, part: PartitionState) -> None:
        pid = part.partition_id
        self._grace_timers.pop(pid, None)
        if pid not in self.state or self.state.get(pid) is not part:  # cleared or replaced meanwhile
            return
        dropped = part.drop_abandoned(part.unproduced(), self.config.seal_grace_s)
        if dropped.size:
            self._served["abandoned_rows"] += int(dropped.size)
            log.warning(
                "partition %r: dropped %d rows whose write did not complete within controller.seal_grace_s="
                "%ss of the seal (a producer died mid-put?)",
                pid, dropped.size, self.config.seal_grace_s,
            )  # fmt: skip
            self._notify(pid)

    def _abort(self, ctx: RequestContext, req: p.Abort) -> p.Ok:
        self.state.get_or_create(req.partition_id).abort(req.reason)
        self._notify(req.partition_id)
        return p.Ok()

    def _report_lost(self, ctx: RequestContext, req: p.ReportLost) -> p.LostReply:
        """Drop every live row of a dead unit: lost rows are reported, never served."""
        from tq_loader.striping import check_stripe_rows, unit_of  # the manager's own rule

        if not 0 <= req.unit < req.num_units:
            raise ValueError(f"unit {req.unit} is outside [0, {req.num_units})")
        check_stripe_rows(req.stripe_rows)  # before anything is dropped
        self.state.allocator.avoid_unit(req.unit, req.num_units, req.stripe_rows)  # new rows: live units only
        lost = 0
        for pid in self.state.list():
            part = self.state.get(pid)
            ids, _, _ = part.production_status(None, [])
            lost += len(part.clear(ids[unit_of(ids, req.num_units, req.stripe_rows) == req.unit]))
            self._notify(pid)
        self._served["lost_rows"] += lost
        self.lost_units[req.unit] = req.reason or "unreachable"
        return p.LostReply(lost_rows=lost)

    def _partition_info(self, ctx: RequestContext, req: p.PartitionInfo) -> p.PartitionInfoReply:
        known = req.partition_id is not None and req.partition_id in self.state
        stats = self.state.get(req.partition_id).statistics() if known else None  # type: ignore[arg-type]
        return p.PartitionInfoReply(stats=stats, next_row_id=self.state.allocator.next_id)

    def _stats(self, ctx: RequestContext, req: p.Stats) -> p.ControllerStatsReply:
        return p.ControllerStatsReply(stats=self.statistics())

    def _export_state(self, ctx: RequestContext, req: p.ExportState) -> p.StateReply:
        return p.StateReply(state=self.state.export_state())

    def _import_state(self, ctx: RequestContext, req: p.ImportState) -> p.Ok:
        """Replace every partition (checkpoint load); the round ledger and sampler caches start over."""
        if req.dry_run:
            ControllerState().import_state(req.state)  # the same validation, into a scratch state
            return p.Ok()
        before = self.state.list()
        self.state.import_state(req.state)  # validates everything before it changes anything
        self.ledger = RoundLedger(self.config.round_cache)
        for pid in dict.fromkeys([*before, *self.state.list()]):
            self._cancel_grace(pid)
            if pid in self.state and self.state.get(pid).sealed:  # a sealed partition's grace restarts
                self._start_grace(ctx.loop, self.state.get(pid))
            for sampler in self._samplers.values():
                sampler.clear_cache(pid)
            self._notify(pid)  # waiters re-check against the imported state
        return p.Ok()

    def statistics(self) -> ControllerStats:
        return ControllerStats(
            partitions=self.state.statistics(),
            waiting_requests=self._waiting,
            lost_units={str(k): v for k, v in self.lost_units.items()},
            rounds=self.ledger.statistics(),
            **self._served,
        )

    # ------------------------------------------------------------------ get_meta
    async def _get_meta(self, ctx: RequestContext, req: p.GetMeta) -> p.MetaReply:
        if req.mode not in _MODES:
            raise ValueError(f"get_meta mode must be one of {_MODES}, not {req.mode!r}")
        if req.batch_size < 0 or (req.mode != "insert" and req.batch_size == 0 and not req.allow_partial):
            raise ValueError(f"batch_size must be positive, got {req.batch_size}")
        self._served["get_meta"] += 1
        if req.mode == "insert":
            part = self.state.get_or_create(req.partition_id)
            ids = part.insert(req.batch_size)
            return p.MetaReply(meta=self._meta(part, ids, []).to_struct())
        if req.dp_rank is not None and not 0 <= req.dp_rank < max(1, req.dp_size):
            raise ValueError(f"dp_rank {req.dp_rank} is outside [0, dp_size={req.dp_size})")
        while True:
            part = self.state.get_or_create(req.partition_id)
            if part.aborted is not None:
                raise ClosedError(f"partition {req.partition_id!r} was aborted: {part.aborted}")
            event = self._event(req.partition_id)  # taken before the check: no lost wake-up
            meta = self._try_fetch(part, req)
            if meta is not None:
                self._served["rows_out"] += meta.size
                self._served["eos"] += int(meta.is_end_of_stream)
                return p.MetaReply(meta=meta.to_struct())
            if self.config.polling_mode:
                return p.MetaReply(meta=BatchMeta.empty().to_struct())
            remaining = ctx.remaining()
            if remaining is not None and remaining <= 0:
                self._served["timeouts"] += 1
                raise TQTimeoutError(self._timeout_message(part, req))
            self._waiting += 1
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass  # loop once more: the check above raises the typed timeout
            finally:
                self._waiting -= 1

    def _timeout_message(self, part: PartitionState, req: p.GetMeta) -> str:
        """What a timed-out get_meta waited for: rows ready/wanted, sealed or not, rows in flight."""
        task = req.task_name or DEFAULT_TASK
        ready = len(part.ready(req.data_fields, task))
        wanted = req.batch_size * (max(1, req.dp_size) if req.batch_index is not None else 1)
        pending = part.count_unconsumed(task) - ready  # rows whose fields are still being written
        head = (
            f"get_meta on partition {req.partition_id!r}: {ready} rows with fields {req.data_fields} ready "
            f"for task {task!r}, {wanted} wanted, {pending} still being written"
        )
        if not part.sealed:
            return f"{head}; the partition is open. Produce more rows, seal it, or pass a longer timeout"
        unproduced = part.unproduced().size
        abandoned = (
            f"; {unproduced} of them have no field yet and are dropped as abandoned "
            f"{self.config.seal_grace_s}s after the seal unless their write completes"
            if unproduced
            else ""
        )
        return (
            f"{head}; the partition is sealed, so the stream ends once they are written{abandoned}. "
            "Pass a longer timeout, or allow_partial=True to take a smaller last batch"
        )

    def add_sampler(self, name: str, sampler: BaseSampler) -> None:
        """Serve requests naming ``name`` with this very instance (an in-process owner's sampler)."""
        self._samplers[name] = sampler

    def _sampler(self, name: str | None) -> BaseSampler:
        name = name or self.config.sampler
        sampler = self._samplers.get(name)
        if sampler is None:
            kwargs = self.config.sampler_kwargs if name == self.config.sampler else {}
            sampler = self._samplers[name] = make_sampler(name, **kwargs)
        return sampler

    def _sampling_config(
        self, part: PartitionState, ready: np.ndarray, req: p.GetMeta, sampler: BaseSampler
    ) -> dict[str, Any]:
        """The caller's sampling config plus what only the controller knows (groups, lengths)."""
        cfg = {k: v for k, v in req.sampling_config.items() if k not in _RESERVED}
        n = cfg.get("n_samples_per_prompt") or getattr(sampler, "n_samples_per_prompt", None)
        if n and int(n) > 1:  # a prompt's n rows are inserted together: group = insertion ordinal // n
            cfg.setdefault("group_ids", part.ordinals(ready) // int(n))
        tag = cfg.pop("seqlen_tag", "total_lengths")
        if "seqlens" not in cfg and isinstance(sampler, SeqlenBalancedSampler):
            cfg["seqlens"] = part.tag_values(ready, tag, default=1)
        return cfg

    def _try_fetch(self, part: PartitionState, req: p.GetMeta) -> BatchMeta | None:
        """The batch for ``req`` now, an end-of-stream marker, or None to keep waiting."""
        task = req.task_name or DEFAULT_TASK
        if req.mode == "force_fetch":  # every live row, as TransferQueue: no waiting, nothing consumed
            ids, _, matrix = part.production_status(None, req.data_fields)
            produced = matrix.all(axis=1) if len(req.data_fields) else np.ones(len(ids), bool)
            return self._meta(part, ids, req.data_fields, produced=produced)
        rank_aware = req.dp_rank is not None and req.batch_index is not None
        if rank_aware:
            return self._fetch_round(part, req, task)
        sampler = self._sampler(req.sampler)
        ready = part.ready(req.data_fields, task, limit=sampler.ready_limit(req.batch_size))
        cfg = self._sampling_config(part, ready, req, sampler)
        sampled, consumed = sampler.sample_batch(ready, req.batch_size, **cfg)
        if len(sampled) == 0:
            left = part.count_unconsumed(task)
            if not part.sealed or left >= req.batch_size:
                return None
            if req.allow_partial and left > 0:
                if left > len(ready):
                    return None  # the tail's columns are still being written
                sampled, consumed = sampler.sample_batch(ready, req.batch_size, **cfg, allow_partial=True)
            if len(sampled) == 0:
                return self._end_of_stream(part, req, task)
        part.mark_consumed(task, np.asarray(consumed, np.int64))
        return self._meta(part, np.asarray(sampled, np.int64), req.data_fields)

    def _fetch_round(self, part: PartitionState, req: p.GetMeta, task: str) -> BatchMeta | None:
        key = (req.partition_id, task)
        assert req.batch_index is not None and req.dp_rank is not None
        found = self.ledger.get(key, req.batch_index)  # NotFoundError if it was evicted
        if found is None:
            found = self._sample_round(part, req, task)
            if found is None:
                return None
            self.ledger.put(key, req.batch_index, found)
        if found.dp_size != max(1, req.dp_size):
            raise ValueError(
                f"batch {req.batch_index} was cut for dp_size={found.dp_size}, not {req.dp_size}"
            )
        if found.end_of_stream:
            return self._end_of_stream(part, req, task)
        return self._meta(part, found.rank(req.dp_rank), req.data_fields)

    def _sample_round(self, part: PartitionState, req: p.GetMeta, task: str) -> Round | None:
        dp_size = max(1, req.dp_size)
        sampler = self._sampler(req.sampler)
        ready = part.ready(req.data_fields, task, limit=sampler.ready_limit(req.batch_size * dp_size))
        cfg = self._sampling_config(part, ready, req, sampler)
        per_rank, consumed = sampler.sample_round(ready, req.batch_size, dp_size, **cfg)
        if not consumed:
            left = part.count_unconsumed(task)
            if not part.sealed or left >= req.batch_size * dp_size:
                return None
            if req.allow_partial and left > 0:
                if left > len(ready):
                    return None  # the tail's columns are still being written
                per_rank, consumed = sampler.sample_round(
                    ready, req.batch_size, dp_size, **cfg, allow_partial=True
                )
            if not consumed:
                return Round.empty(dp_size)
        part.mark_consumed(task, np.asarray(consumed, np.int64))
        return Round.from_lists(per_rank)

    def _end_of_stream(self, part: PartitionState, req: p.GetMeta, task: str) -> BatchMeta:
        """The empty end-of-stream batch; ``dropped_rows``: rows this task will never be served."""
        meta = self._meta(part, np.empty(0, np.int64), req.data_fields, end_of_stream=True)
        meta.set_extra_info("dropped_rows", part.count_unconsumed(task))
        if part.abandoned_rows:
            meta.set_extra_info("abandoned_rows", part.abandoned_rows)
        return meta

    def _meta(
        self,
        part: PartitionState,
        ids: np.ndarray,
        fields: list[str],
        *,
        end_of_stream: bool = False,
        produced: np.ndarray | None = None,
    ) -> BatchMeta:
        schemas = part.field_schemas
        return BatchMeta(
            global_indexes=ids,
            partition_ids=np.full(len(ids), part.partition_id, dtype=object),
            field_schema={f: schemas[f] for f in fields if f in schemas},
            production_status=np.ones(len(ids), np.int8) if produced is None else produced.astype(np.int8),
            custom_meta=part.get_tags(ids) if len(ids) and part.num_tagged else None,  # None: all empty
            end_of_stream=end_of_stream,
        )
