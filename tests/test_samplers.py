"""Tests of tq_loader.samplers: sampling rules, rounds, balancing, registry, ledger."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_loader.errors import NotFoundError, TQError
from tq_loader.samplers import (
    BaseSampler,
    GRPOGroupNSampler,
    RankAwareSampler,
    Round,
    RoundLedger,
    SeqlenBalancedSampler,
    SequentialSampler,
    available_samplers,
    get_sampler_class,
    get_seqlen_balanced_partitions,
    karmarkar_karp,
    make_sampler,
    register_sampler,
)
from tq_loader.samplers import base as base_mod


def _flat(parts: Any) -> list[int]:
    return list(itertools.chain.from_iterable(parts))


def _spread(sums: list[float]) -> float:
    return max(sums) - min(sums)


# --------------------------------------------------------------------------------------- sequential


def test_sequential_takes_first_rows_in_order() -> None:
    assert SequentialSampler().sample([2, 5, 7, 9], 3) == ([2, 5, 7], [2, 5, 7])


def test_sequential_accepts_numpy_and_returns_python_ints() -> None:
    sampled, consumed = SequentialSampler().sample(np.arange(10, 20), 2)
    assert sampled == [10, 11] and consumed == [10, 11]
    assert all(type(i) is int for i in sampled)


def test_sequential_too_few_ready_and_zero_batch() -> None:
    assert SequentialSampler().sample([1, 2], 3) == ([1, 2], [1, 2])  # what is ready, as TransferQueue
    assert SequentialSampler().sample([1, 2], 3, allow_partial=False) == ([], [])
    assert SequentialSampler().sample([1, 2], 3, allow_partial=True) == ([1, 2], [1, 2])
    assert SequentialSampler().sample([], 1) == ([], [])
    assert SequentialSampler().sample([1, 2, 3], 0) == ([], [])  # as TransferQueue


def test_sample_batch_waits_until_enough_rows_are_ready() -> None:
    """The controller's entry: too few ready rows is "wait" whatever the sampler returns for them."""
    sampler = SequentialSampler()
    assert sampler.sample_batch([1, 2], 3) == ([], [])
    assert sampler.sample_batch([1, 2, 3, 4], 3) == ([1, 2, 3], [1, 2, 3])
    assert sampler.sample_batch([1, 2], 3, allow_partial=True) == ([1, 2], [1, 2])
    assert sampler.sample_batch([], 3, allow_partial=True) == ([], [])
    assert GRPOGroupNSampler(2).sample_batch([0, 1, 3], 2) == ([0, 1], [0, 1])
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample_batch([1], 0)


def test_unknown_sampling_config_keys_are_ignored() -> None:
    out = SequentialSampler().sample([0, 1, 2], 2, dp_rank=1, batch_index=4, foo="bar", partition=object())
    assert out == ([0, 1], [0, 1])


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
@pytest.mark.parametrize("sampler", [SequentialSampler(), RankAwareSampler(), GRPOGroupNSampler(2)], ids=repr)
def test_invalid_batch_size_is_rejected(sampler: BaseSampler, bad: Any) -> None:
    # a negative size is refused: TransferQueue's sequential sampler slices with it (all rows but the last)
    with pytest.raises(ValueError, match="batch_size") as info:
        sampler.sample([0, 1], bad)
    assert isinstance(info.value, TQError)


def test_non_integer_ready_indexes_are_rejected() -> None:
    with pytest.raises(ValueError, match="ready_indexes"):
        SequentialSampler().sample([0.5, 1.5], 1)


def test_call_is_sample() -> None:
    assert SequentialSampler()([4, 5], 1) == ([4], [4])


# -------------------------------------------------------------------------------------- rank aware


def test_rank_aware_keeps_transferqueue_signatures() -> None:
    sampler = RankAwareSampler("ignored", extra=1)
    # TransferQueue order: ready, batch_size, dp_rank, batch_index, task_name, partition_id
    assert sampler.sample([3, 4, 5], 2, 0, 7, "train", "p0") == ([3, 4], [3, 4])
    assert sampler.sample([3], 2, dp_rank=1, batch_index=0) == ([], [])
    assert sampler.sample([3], 2, dp_rank=1, batch_index=0, allow_partial=True) == ([3], [3])


def test_rank_aware_rejects_negative_rank() -> None:
    with pytest.raises(ValueError, match="dp_rank"):
        RankAwareSampler().sample([0, 1], 1, dp_rank=-1)


# ------------------------------------------------------------------------------------------- GRPO


def test_grpo_skips_incomplete_groups() -> None:
    sampler = GRPOGroupNSampler(3)
    assert sampler.sample([0, 1, 3, 4, 5, 6, 7, 9, 10, 11], 6) == ([3, 4, 5, 9, 10, 11],) * 2
    assert sampler.sample([0, 1, 3, 4, 6, 7], 6) == ([], [])


def test_grpo_aligned_rule_never_takes_a_run_straddling_two_prompts() -> None:
    # With group_base, groups are aligned blocks: 1,2,3 are consecutive but belong to prompts 0 (0..2)
    # and 1 (3..5).
    assert GRPOGroupNSampler(3).sample([1, 2, 3], 3, group_base=0) == ([], [])
    assert GRPOGroupNSampler(3).sample([1, 2, 3], 3, group_base=1) == ([1, 2, 3], [1, 2, 3])
    # Without group_ids or group_base (a direct call), TransferQueue's run rule: any n consecutive.
    assert GRPOGroupNSampler(3).sample([1, 2, 3], 3) == ([1, 2, 3], [1, 2, 3])


def test_grpo_run_rule_sorts_and_cuts_runs_from_their_start() -> None:
    sampler = GRPOGroupNSampler(4)
    assert sampler.sample([3, 4, 5, 6, 9, 10, 11, 12], 8) == ([3, 4, 5, 6, 9, 10, 11, 12],) * 2
    assert sampler.sample([10, 11, 12, 5, 6, 7, 8, 9], 8) == ([5, 6, 7, 8, 9, 10, 11, 12],) * 2
    assert sampler.sample([0, 1, 2, 3, 4, 5], 8) == ([], [])  # the run 0..5 holds one group, not two
    assert GRPOGroupNSampler(2).sample([0, 0, 1, 1], 4) == ([], [])  # duplicates are not a group
    assert sampler.sample(list(range(8)), 0) == ([], [])


def test_grpo_batch_size_not_multiple_of_n_is_value_error() -> None:
    with pytest.raises(ValueError, match=r"multiple of n_samples_per_prompt \(4\).*k\*4"):
        GRPOGroupNSampler(4).sample(list(range(16)), 6)


def test_grpo_n_from_sampling_config_wins() -> None:
    sampler = GRPOGroupNSampler(4)
    assert sampler.sample([0, 1, 2, 4, 5], 4, n_samples_per_prompt=2) == ([0, 1, 4, 5],) * 2
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        sampler.sample([0, 1], 2, n_samples_per_prompt=0)


def test_grpo_allow_partial_returns_whole_groups_only() -> None:
    sampler = GRPOGroupNSampler(2)
    ready = [0, 1, 2, 4, 5, 7]  # complete: {0,1}, {4,5}
    assert sampler.sample(ready, 8) == ([], [])
    assert sampler.sample(ready, 8, allow_partial=True) == ([0, 1, 4, 5],) * 2
    assert sampler.sample([2, 7], 8, allow_partial=True) == ([], [])


def test_grpo_group_ids_allow_non_contiguous_groups() -> None:
    ready = np.array([10, 11, 12, 13, 14, 15, 16])
    gids = np.array(["b", "a", "b", "c", "a", "c", "b"])  # b: 10,12,16  a: 11,14  c: 13,15
    sampler = GRPOGroupNSampler(2)
    # 'a' and 'c' are complete; 'a' appears first. 'b' has 3 rows > n -> error.
    with pytest.raises(ValueError, match="group id 'b' has 3 ready rows"):
        sampler.sample(ready, 4, group_ids=gids)
    with pytest.raises(ValueError, match="group id 'b' has 3 ready rows"):
        sampler.sample(ready, 4, group_ids=np.array(gids.tolist(), dtype=object))
    gids = np.array(["b", "a", "d", "c", "a", "c", "e"])
    assert sampler.sample(ready, 4, group_ids=gids) == ([11, 14, 13, 15],) * 2
    assert sampler.sample(ready, 6, group_ids=gids) == ([], [])
    with pytest.raises(ValueError, match="align"):
        sampler.sample(ready, 2, group_ids=gids[:3])


@settings(max_examples=80, deadline=None)
@given(
    ready=st.lists(st.integers(0, 80), unique=True, max_size=70).map(sorted),
    n=st.integers(1, 4),
    groups=st.integers(1, 6),
    partial=st.booleans(),
)
def test_grpo_matches_brute_force_reference(ready: list[int], n: int, groups: int, partial: bool) -> None:
    have = set(ready)
    complete = [g for g in range(81 // n + 1) if all(g * n + j in have for j in range(n))]
    chosen = complete[:groups]
    expected = [g * n + j for g in chosen for j in range(n)]
    if len(chosen) < groups and not partial:
        expected = []
    got = GRPOGroupNSampler(n).sample(ready, groups * n, allow_partial=partial, group_base=0)
    assert got == (expected, expected)
    # the labelled rule with ids = index // n must agree
    ids = np.asarray(ready, dtype=np.int64) // n
    assert GRPOGroupNSampler(n).sample(ready, groups * n, allow_partial=partial, group_ids=ids)[0] == expected
    # the run rule (no group_ids / group_base): each run of consecutive indexes cut from its start
    runs: list[list[int]] = []
    for i in ready:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    run_groups = [run[k : k + n] for run in runs for k in range(0, len(run) - n + 1, n)][:groups]
    expected = [] if len(run_groups) < groups and not partial else _flat(run_groups)
    assert GRPOGroupNSampler(n).sample(ready, groups * n, allow_partial=partial)[0] == expected


def test_grpo_constructor_validates_n() -> None:
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        GRPOGroupNSampler(0)


# ------------------------------------------------------------------------------------- sample_round


def test_round_full_split_is_contiguous_and_disjoint() -> None:
    per_rank, consumed = SequentialSampler().sample_round(list(range(20)), 3, 4)
    assert per_rank == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert consumed == list(range(12))


def test_round_waits_when_not_enough_ready() -> None:
    assert SequentialSampler().sample_round(list(range(11)), 3, 4) == ([], [])


def test_round_tail_is_split_evenly() -> None:
    per_rank, consumed = SequentialSampler().sample_round(list(range(10)), 4, 4, allow_partial=True)
    assert [len(p) for p in per_rank] == [3, 3, 2, 2]
    assert _flat(per_rank) == consumed == list(range(10))


def test_round_tail_shorter_than_ranks_is_dropped() -> None:
    assert SequentialSampler().sample_round([0, 1, 2], 4, 4, allow_partial=True) == ([], [])


def test_grpo_round_keeps_groups_whole() -> None:
    ready = list(range(24))
    per_rank, _ = GRPOGroupNSampler(2).sample_round(ready, 4, 3)
    assert per_rank == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    # tail of 5 groups over 3 ranks: 2, 2, 1 groups
    per_rank, consumed = GRPOGroupNSampler(2).sample_round(list(range(10)), 4, 3, allow_partial=True)
    assert [len(p) for p in per_rank] == [4, 4, 2]
    assert all(p[0] % 2 == 0 and len(p) % 2 == 0 for p in per_rank)
    assert consumed == list(range(10))
    # tail of 2 groups over 3 ranks is dropped
    assert GRPOGroupNSampler(2).sample_round([0, 1, 2, 3], 4, 3, allow_partial=True) == ([], [])


def test_grpo_round_rejects_per_rank_batch_not_multiple_of_n() -> None:
    # total 2*3=6 is a multiple of 3, but a rank of 2 rows cannot hold a group of 3
    with pytest.raises(ValueError, match="per-rank batch_size"):
        GRPOGroupNSampler(3).sample_round(list(range(12)), 2, 3)


@pytest.mark.parametrize("bad", [0, -2, 1.0])
def test_round_rejects_bad_dp_size(bad: Any) -> None:
    with pytest.raises(ValueError, match="dp_size"):
        SequentialSampler().sample_round([0, 1], 1, bad)


@settings(max_examples=60, deadline=None)
@given(
    ready=st.lists(st.integers(0, 200), unique=True, max_size=80).map(sorted),
    batch=st.integers(1, 8),
    dp=st.integers(1, 6),
    partial=st.booleans(),
)
def test_round_properties(ready: list[int], batch: int, dp: int, partial: bool) -> None:
    per_rank, consumed = SequentialSampler().sample_round(ready, batch, dp, allow_partial=partial)
    if not per_rank:
        assert consumed == []
        assert len(ready) < dp * batch and (not partial or len(ready) < dp)
        return
    flat = _flat(per_rank)
    assert len(per_rank) == dp and sorted(flat) == sorted(consumed) and len(set(flat)) == len(flat)
    assert set(flat) <= set(ready)
    sizes = [len(p) for p in per_rank]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1 and max(sizes) <= batch


# ----------------------------------------------------------------------------------- seqlen balance


def test_karmarkar_karp_small_optimum_and_cardinality() -> None:
    parts = karmarkar_karp(list(range(1, 9)), 2)  # 1..8: optimum 18 / 18 with 4 items each
    assert sorted(np.concatenate(parts).tolist()) == list(range(8))
    assert [len(p) for p in parts] == [4, 4]
    assert [float(np.sum(np.arange(1, 9)[p])) for p in parts] == [18.0, 18.0]


def test_karmarkar_karp_pads_uneven_counts_to_near_equal_sizes() -> None:
    parts = karmarkar_karp([5, 1, 1, 1, 1, 1, 1], 3)
    assert sorted(len(p) for p in parts) == [2, 2, 3]
    assert sorted(np.concatenate(parts).tolist()) == list(range(7))


def test_karmarkar_karp_unequal_size_mode_and_validation() -> None:
    parts = karmarkar_karp([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2, equal_size=False)
    sums = [sum([10, *[1] * 10][i] for i in p) for p in parts]
    assert sums == [10, 10]
    with pytest.raises(ValueError, match="non-negative"):
        karmarkar_karp([1, -1], 2)
    assert [len(p) for p in karmarkar_karp([], 3)] == [0, 0, 0]
    assert karmarkar_karp([3, 1, 2], 1)[0].tolist() == [0, 1, 2]


def test_get_seqlen_balanced_partitions_compat() -> None:
    parts = get_seqlen_balanced_partitions([4, 3, 2, 1], 2, equal_size=True)
    assert sorted(_flat(parts)) == [0, 1, 2, 3] and all(p == sorted(p) for p in parts)
    with pytest.raises(ValueError):
        get_seqlen_balanced_partitions([1], 2, equal_size=True)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(0, 10_000), min_size=1, max_size=60),
    k=st.integers(1, 8),
)
def test_karmarkar_karp_is_a_partition_with_equal_cardinality(weights: list[int], k: int) -> None:
    parts = karmarkar_karp(weights, k)
    assert len(parts) == k
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(weights)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_seqlen_balanced_beats_contiguous_split_on_skewed_lengths() -> None:
    rng = np.random.default_rng(1234)
    n, dp, per_rank = 4, 4, 16
    ready = np.arange(256)
    # Heavy-tailed lengths, sorted within the stream so contiguous slices are maximally unequal.
    seqlens = np.sort(rng.lognormal(6.0, 1.0, size=len(ready)).astype(np.int64) + 1)
    sampler = SeqlenBalancedSampler(n_samples_per_prompt=n, dp_size=dp)
    balanced, consumed = sampler.sample_round(ready, per_rank, dp, seqlens=seqlens)
    contiguous, _ = sampler.sample_round(ready, per_rank, dp)
    assert sorted(consumed) == list(range(dp * per_rank))

    def sums(parts: list[list[int]]) -> list[float]:
        return [float(seqlens[p].sum()) for p in parts]

    assert [len(p) for p in balanced] == [per_rank] * dp
    assert _spread(sums(balanced)) < _spread(sums(contiguous)) / 10
    for part in balanced:  # groups stay whole on one rank
        assert sorted({i // n for i in part}) == sorted(i // n for i in part[::n])
        assert len(part) == len(set(part))


def test_seqlen_balanced_groups_whole_and_ranks_disjoint() -> None:
    ready = np.array(
        [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    )  # group 2 (8) incomplete
    seqlens = np.arange(len(ready)) ** 2
    per_rank, consumed = SeqlenBalancedSampler(3, 2).sample_round(ready, 6, 2, seqlens=seqlens)
    flat = _flat(per_rank)
    assert 6 not in flat and 7 not in flat and len(set(flat)) == 12
    assert sorted(flat) == sorted(consumed)
    for part in per_rank:
        assert len(part) == 6
        for j in range(0, 6, 3):
            assert part[j] % 3 == 0 and part[j : j + 3] == list(range(part[j], part[j] + 3))


def test_seqlen_balanced_with_group_ids() -> None:
    ready = np.arange(8)
    gids = [0, 1, 0, 1, 2, 3, 2, 3]  # interleaved groups of 2
    lens = np.array([100, 1, 100, 1, 100, 1, 100, 1])  # groups 0 and 2 are heavy
    per_rank, consumed = SeqlenBalancedSampler(2).sample_round(ready, 4, 2, seqlens=lens, group_ids=gids)
    assert sorted(consumed) == list(range(8))
    assert [int(lens[p].sum()) for p in per_rank] == [202, 202]
    for part in per_rank:
        assert sorted(gids[i] for i in part)[::2] == sorted(gids[i] for i in part)[1::2]


def test_seqlen_balanced_without_seqlens_splits_contiguously() -> None:
    per_rank, _ = SeqlenBalancedSampler(2).sample_round(list(range(8)), 4, 2)
    assert per_rank == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_seqlen_balanced_tail_and_validation() -> None:
    sampler = SeqlenBalancedSampler(2, dp_size=3)
    ready = list(range(10))  # 5 groups
    lens = [1] * 10
    per_rank, _ = sampler.sample_round(ready, 4, 3, seqlens=lens, allow_partial=True)
    assert sorted(len(p) for p in per_rank) == [2, 4, 4]
    assert sampler.sample_round(ready, 4, 3, seqlens=lens) == ([], [])
    assert sampler.sample_round(ready[:4], 4, 3, seqlens=lens[:4], allow_partial=True) == ([], [])
    with pytest.raises(ValueError, match="seqlens must align"):
        sampler.sample_round(ready, 2, 3, seqlens=lens[:5])
    with pytest.raises(ValueError, match="per-rank batch_size"):
        sampler.sample_round(ready, 3, 3, seqlens=lens)


def test_seqlen_balanced_sample_is_group_sampling_and_deterministic() -> None:
    sampler = SeqlenBalancedSampler(2, dp_size=2)
    assert sampler.sample([0, 1, 3, 4, 5], 2) == ([0, 1], [0, 1])
    lens = np.random.default_rng(0).integers(1, 1000, size=32)
    first = sampler.sample_round(np.arange(32), 8, 4, seqlens=lens)
    assert sampler.sample_round(np.arange(32), 8, 4, seqlens=lens) == first
    assert 0 in first[0][0]  # rank 0 holds the first group


# -------------------------------------------------------------------------------------- registry


@pytest.fixture
def clean_registry():
    saved = dict(base_mod._REGISTRY)
    yield
    base_mod._REGISTRY.clear()
    base_mod._REGISTRY.update(saved)


def test_builtin_names_and_aliases() -> None:
    expected = {
        "sequential": SequentialSampler,
        "SequentialSampler": SequentialSampler,
        "grpo_group_n": GRPOGroupNSampler,
        "GRPOGroupNSampler": GRPOGroupNSampler,
        "rank_aware": RankAwareSampler,
        "RankAwareSampler": RankAwareSampler,
        "seqlen_balanced": SeqlenBalancedSampler,
        "SeqlenBalancedSampler": SeqlenBalancedSampler,
    }
    for name, cls in expected.items():
        assert get_sampler_class(name) is cls
    assert set(expected) <= set(available_samplers())


def test_unknown_sampler_lists_registered_names() -> None:
    with pytest.raises(NotFoundError, match=r"unknown sampler 'nope'.*grpo_group_n.*sequential") as info:
        get_sampler_class("nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, TQError)
    with pytest.raises(NotFoundError):
        make_sampler("nope")


def test_make_sampler_from_name_class_and_instance() -> None:
    s = make_sampler("grpo_group_n", n_samples_per_prompt=4)
    assert isinstance(s, GRPOGroupNSampler) and s.n_samples_per_prompt == 4
    s2 = make_sampler(SeqlenBalancedSampler, n_samples_per_prompt=2, dp_size=8)
    assert s2.dp_size == 8
    assert make_sampler(s) is s
    with pytest.raises(ValueError, match="instance"):
        make_sampler(s, n_samples_per_prompt=2)
    with pytest.raises(TypeError):
        make_sampler(42)  # type: ignore[arg-type]


class _EveryOther(BaseSampler):
    """A user sampler: every other ready row; consumes the skipped ones too; counts calls."""

    def __init__(self, stride: int = 2) -> None:
        super().__init__()
        self.stride = stride
        self.calls = 0

    def sample(self, ready_indexes, batch_size, *args, **sampling_config):
        ready = list(ready_indexes)[: batch_size * self.stride]
        if len(ready) < batch_size * self.stride:
            return [], []
        self.calls += 1
        return ready[:: self.stride], ready

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state) -> None:
        self.calls = int(state["calls"])


def test_custom_sampler_registration(clean_registry) -> None:
    register_sampler("every_other", _EveryOther)
    s = make_sampler("every_other", stride=2)
    assert s.sample(list(range(6)), 2) == ([0, 2], [0, 1, 2, 3])
    # the default round works for user samplers; consumed keeps the skipped rows
    per_rank, consumed = s.sample_round(list(range(10)), 1, 2)
    assert per_rank == [[0], [2]] and consumed == [0, 1, 2, 3]

    @register_sampler("decorated")
    class Decorated(SequentialSampler):
        pass

    assert get_sampler_class("decorated") is Decorated
    register_sampler("decorated", Decorated)  # idempotent for the same class
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("decorated", _EveryOther)
    register_sampler("decorated", _EveryOther, replace=True)
    assert get_sampler_class("decorated") is _EveryOther
    with pytest.raises(TypeError, match="subclass of BaseSampler"):
        register_sampler("bad", dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        register_sampler("", _EveryOther)


# ------------------------------------------------------------------------------------ state dicts


@pytest.mark.parametrize(
    "sampler",
    [SequentialSampler(), RankAwareSampler(), GRPOGroupNSampler(4), SeqlenBalancedSampler(2, 4)],
    ids=repr,
)
def test_builtin_samplers_are_stateless(sampler: BaseSampler) -> None:
    assert sampler.state_dict() == {}
    sampler.load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="stateless"):
        sampler.load_state_dict({"calls": 3})


def test_stateful_user_sampler_round_trips() -> None:
    a = _EveryOther()
    a.sample(list(range(8)), 2)
    a.sample(list(range(8)), 2)
    b = _EveryOther()
    b.load_state_dict(a.state_dict())
    assert b.calls == 2 and b.state_dict() == a.state_dict()


def test_clear_cache_drops_user_state() -> None:
    s = _EveryOther()
    s._states["p0"] = {"task": 1}
    s.clear_cache("p0")
    s.clear_cache("never-seen")
    assert s._states == {}


# ------------------------------------------------------------------------------------------ ledger

KEY = ("p0", "actor")


def _round(*parts: list[int], eos: bool = False) -> Round:
    return Round.from_lists(parts, end_of_stream=eos)


def test_round_is_immutable_and_validated() -> None:
    src = np.array([1, 2])
    r = Round((src, np.array([3])))
    src[0] = 99
    assert r.rank(0).tolist() == [1, 2] and r.dp_size == 2 and r.num_rows == 3
    assert r.consumed.tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        r.rank(0)[0] = 5
    with pytest.raises(ValueError, match="dp_rank"):
        r.rank(2)
    with pytest.raises(ValueError, match="dp_size=3"):
        Round((src,), dp_size=3)
    with pytest.raises(ValueError):
        Round(())
    empty = Round.empty(4)
    assert empty.end_of_stream and empty.dp_size == 4 and empty.num_rows == 0


def test_ledger_put_get_and_dp_size_mismatch() -> None:
    ledger = RoundLedger()
    assert ledger.get(KEY, 0) is None
    r = _round([0, 1], [2, 3])
    ledger.put(KEY, 0, r)
    assert ledger.get(KEY, 0) is r and ledger.get(KEY, 0, dp_size=2) is r
    assert ledger.get(("p0", "critic"), 0) is None  # tasks are separate
    with pytest.raises(ValueError, match="dp_size=2 but this request says dp_size=4"):
        ledger.get(KEY, 0, dp_size=4)
    with pytest.raises(ValueError, match="already has a round"):
        ledger.put(KEY, 0, _round([9], [8]))
    with pytest.raises(ValueError, match="batch_index"):
        ledger.put(KEY, -1, r)
    with pytest.raises(ValueError, match="partition_id, task_name"):
        ledger.put("p0", 1, r)  # type: ignore[arg-type]


def test_ledger_evicts_lowest_batch_index_first() -> None:
    ledger = RoundLedger(capacity_rounds=3)
    for i in (5, 1, 3, 2):  # out of order on purpose
        ledger.put(KEY, i, _round([i]))
    assert ledger.batch_indexes(KEY) == [2, 3, 5]
    assert ledger.is_evicted(KEY, 1) and ledger.is_evicted(KEY, 0) and not ledger.is_evicted(KEY, 2)
    assert ledger.evicted_below(KEY) == 2
    with pytest.raises(NotFoundError, match=r"batch_index 1 .*'p0'.*'actor'.*capacity_rounds"):
        ledger.get(KEY, 1)
    with pytest.raises(ValueError, match="watermark"):
        ledger.put(KEY, 0, _round([0]))
    ledger.put(KEY, 9, _round([9]))
    assert ledger.batch_indexes(KEY) == [3, 5, 9] and ledger.evicted_below(KEY) == 3
    assert ledger.get(KEY, 4) is None  # a gap above the watermark is just not cut yet
    stats = ledger.statistics()
    assert (stats.rounds, stats.evictions, stats.evicted_lookups, stats.puts) == (3, 2, 1, 5)
    assert stats.capacity_rounds == 3 and stats.keys == 1


def test_ledger_capacity_is_per_key() -> None:
    ledger = RoundLedger(capacity_rounds=2)
    for i in range(2):
        ledger.put(("p0", "a"), i, _round([i]))
        ledger.put(("p0", "b"), i, _round([i]))
    assert len(ledger) == 4 and not ledger.is_evicted(("p0", "a"), 0)


def test_ledger_drop_and_drop_partition_reset_watermarks() -> None:
    ledger = RoundLedger(capacity_rounds=1)
    ledger.put(("p0", "a"), 0, _round([0]))
    ledger.put(("p0", "a"), 1, _round([1]))
    ledger.put(("p0", "b"), 0, _round([0]))
    ledger.put(("p1", "a"), 0, _round([0]))
    assert ledger.is_evicted(("p0", "a"), 0)
    assert ledger.drop_partition("p0") == 2
    assert ("p0", "a") not in ledger and ("p1", "a") in ledger
    assert not ledger.is_evicted(("p0", "a"), 0)
    ledger.put(("p0", "a"), 0, _round([5]))  # a cleared partition starts over
    assert ledger.drop(("p1", "a")) == 1 and ledger.drop(("p1", "a")) == 0
    with pytest.raises(ValueError):
        RoundLedger(capacity_rounds=0)


def test_ledger_composes_with_group_sampler_for_any_arrival_order() -> None:
    """What the controller does: first request for a batch index cuts the round, others read it."""
    ledger, sampler, dp = RoundLedger(), GRPOGroupNSampler(2), 3
    consumed_so_far: set[int] = set()
    ready_pool = np.arange(36)

    def request(dp_rank: int, batch_index: int) -> list[int]:
        cached = ledger.get(KEY, batch_index, dp_size=dp)
        if cached is None:
            ready = ready_pool[~np.isin(ready_pool, list(consumed_so_far))]
            per_rank, consumed = sampler.sample_round(ready, 4, dp)
            consumed_so_far.update(consumed)
            cached = Round.from_lists(per_rank)
            ledger.put(KEY, batch_index, cached)
        return cached.rank(dp_rank).tolist()

    first = {(r, b): request(r, b) for b in range(3) for r in (2, 0, 1)}
    again = {(r, b): request(r, b) for b in (1, 0, 2) for r in range(dp)}
    assert first == again
    rows = _flat(first.values())
    assert sorted(rows) == list(range(36))
    assert all(len(v) == 4 and v[0] % 2 == 0 for v in first.values())
