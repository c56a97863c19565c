"""Samplers: which ready rows a consumer gets next, and the ledger of data-parallel rounds.

Built-in names (``make_sampler(name, **init_kwargs)``): ``"sequential"``, ``"grpo_group_n"``,
``"rank_aware"``, ``"seqlen_balanced"``, and TransferQueue's class names as aliases
(``"SequentialSampler"``, ...). Register your own with :func:`register_sampler`.
"""

from __future__ import annotations

from tq_loader.samplers.base import (
    BaseSampler,
    available_samplers,
    get_sampler_class,
    make_sampler,
    register_sampler,
)
from tq_loader.samplers.builtin import GRPOGroupNSampler, RankAwareSampler, SequentialSampler
from tq_loader.samplers.rounds import LedgerKey, LedgerStatistics, Round, RoundLedger
from tq_loader.samplers.seqlen import (
    PartitionCountError,
    SeqlenBalancedSampler,
    get_seqlen_balanced_partitions,
    karmarkar_karp,
)

__all__ = [
    "BaseSampler",
    "GRPOGroupNSampler",
    "LedgerKey",
    "LedgerStatistics",
    "PartitionCountError",
    "RankAwareSampler",
    "Round",
    "RoundLedger",
    "SeqlenBalancedSampler",
    "SequentialSampler",
    "available_samplers",
    "get_sampler_class",
    "get_seqlen_balanced_partitions",
    "karmarkar_karp",
    "make_sampler",
    "register_sampler",
]
