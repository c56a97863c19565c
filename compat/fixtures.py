"""tq_loader stand-ins for TransferQueue-test scaffolding that reaches into TransferQueue's internals.

Some e2e modules fetch TransferQueue's controller Ray actor (``ray.get_actor("TransferQueueController",
namespace="transfer_queue")``) to clear partitions: after each test (an autouse fixture) and between a
checkpoint's save and load. On tq_loader (compat/excluded.toml, ``[[fixture_override]]``) that
``controller`` fixture yields :class:`PublicController`, which does the same through the public
client. Any other actor method fails the test, saying it belongs in the exclusion list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


class _RemoteMethod:
    """``actor.method.remote(*args)`` shape: runs ``fn`` now and hands back an object ref for ray.get."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.put(self.fn(*args, **kwargs))


def _client() -> Any:
    import transfer_queue as tq

    return tq.get_client()


class PublicController:
    """The two controller-actor calls TransferQueue's test scaffolding makes, over the public client."""

    list_partitions = _RemoteMethod(lambda: list(_client().get_partition_list()))
    clear_partition = _RemoteMethod(lambda partition_id: _client().clear_partition(partition_id))

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(
            f"this test calls TransferQueue's controller Ray actor (controller.{name}), which is "
            "TransferQueue-internal: list it in compat/excluded.toml"
        )


@pytest.fixture(name="controller")
def controller(tq_system: Any) -> PublicController:
    return PublicController()


REPLACEMENTS = {"controller": controller}
