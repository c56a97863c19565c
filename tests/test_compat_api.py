"""TransferQueue API behaviours of the client and init (issue 10): sampler objects in the config,
numpy arrays in sampling_config, kv_retrieve_keys, status calls before any producer ran."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

import tq_loader as tq
from tq_loader.errors import ArgumentError
from tq_loader.samplers import BaseSampler


class _Reversed(BaseSampler):
    """Newest rows first; counts its calls so the test sees this very instance served requests."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def sample(self, ready_indexes, batch_size, *args, **kwargs):
        self.calls += 1
        picked = list(ready_indexes)[::-1][:batch_size]
        return picked, picked


class _ByScore(BaseSampler):
    """Highest ``scores`` first -- uses numpy methods on the array it is given."""

    def sample(self, ready_indexes, batch_size, scores=None, *args, **kwargs):
        assert isinstance(scores, np.ndarray), type(scores)
        order = np.argsort(-scores[np.asarray(ready_indexes)])[:batch_size]
        picked = [int(ready_indexes[i]) for i in order]
        return picked, picked


@pytest.fixture
def fresh():
    tq.close()
    yield
    tq.close()


def test_a_sampler_instance_in_the_config_is_used_by_the_embedded_controller(fresh):
    sampler = _Reversed()
    tq.init(OmegaConf.create({"controller": {"sampler": sampler}}, flags={"allow_objects": True}))
    client = tq.get_client()
    client.put(TensorDict({"x": torch.arange(6)}, batch_size=[6]), partition_id="p")
    assert client.get_meta(["x"], 3, "p", task_name="t").global_indexes == [5, 4, 3]
    assert sampler.calls >= 1


def test_a_sampler_class_in_the_config_is_instantiated(fresh):
    tq.init({"controller": {"sampler": _Reversed}})
    client = tq.get_client()
    client.put(TensorDict({"x": torch.arange(4)}, batch_size=[4]), partition_id="p")
    assert client.get_meta(["x"], 2, "p", task_name="t").global_indexes == [3, 2]


def test_a_sampler_object_cannot_go_to_a_remote_controller(fresh):
    with pytest.raises(ArgumentError, match="register_sampler"):
        tq.init({"placement": "ray", "controller": {"sampler": _Reversed()}})
    assert not tq.is_initialized()


@pytest.mark.parametrize("in_process", [True, False])
def test_numpy_arrays_in_sampling_config_reach_the_sampler_as_arrays(fresh, in_process):
    tq.register_sampler("by_score", _ByScore, replace=True)
    tq.init({"client": {"in_process": in_process}})
    client = tq.get_client()
    client.put(TensorDict({"x": torch.arange(5)}, batch_size=[5]), partition_id="p")
    scores = np.array([0.1, 5.0, 0.2, 9.0, 1.0])
    meta = client.get_meta(
        ["x"], 2, "p", task_name="t", sampler="by_score", sampling_config={"scores": scores}
    )
    assert meta.global_indexes == [3, 1]


def test_kv_retrieve_keys_maps_rows_back_to_keys(fresh):
    tq.init()
    tq.kv_batch_put(["a", "b", "c"], "kv", TensorDict({"x": torch.arange(3)}, batch_size=[3]))
    client = tq.get_client()
    meta = client.kv_retrieve_meta(["c", "a"], "kv")
    assert client.kv_retrieve_keys(meta.global_indexes, "kv") == ["c", "a"]
    assert client.kv_retrieve_keys(meta.global_indexes[0], "kv") == ["c"]
    unkeyed = client.put(TensorDict({"x": torch.arange(1)}, batch_size=[1]), partition_id="kv")
    with pytest.raises(tq.NotFoundError, match="no key"):
        client.kv_retrieve_keys(unkeyed.global_indexes, "kv")
    with pytest.raises(ArgumentError, match="global_indexes"):
        client.kv_retrieve_keys("c", "kv")


def test_checkpoint_keywords_and_missing_directory_as_transfer_queue(fresh, tmp_path):
    tq.init()
    tq.kv_put("k", "ck", {"x": torch.tensor([1.0])})
    with pytest.warns(UserWarning, match="include_storage=False. has no effect"):
        tq.save_checkpoint(checkpoint_dir=tmp_path / "ck", include_storage=False, metadata={"step": 3})
    tq.kv_clear("k", "ck")
    assert tq.load_checkpoint(checkpoint_dir=tmp_path / "ck") == {"step": 3}
    assert tq.kv_batch_get(["k"], "ck")["x"].tolist() == [[1.0]]
    with pytest.raises(FileNotFoundError):
        tq.load_checkpoint(tmp_path / "nothing-here")


def test_reset_consumption_returns_true(fresh):
    tq.init()
    client = tq.get_client()
    client.put(TensorDict({"x": torch.arange(2)}, batch_size=[2]), partition_id="p")
    client.get_meta(["x"], 2, "p", task_name="t")
    assert client.reset_consumption("p", "t") is True
    assert client.get_meta(["x"], 2, "p", task_name="t").size == 2
