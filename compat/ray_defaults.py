"""Ray settings for TransferQueue's tests and tutorials on a small shared machine.

They call ``ray.init(namespace=...)`` with no resources; on 2 cores TransferQueue's actors (one CPU
each) would stay pending, and a bare ``ray.init()`` attaches to any cluster ``ray start`` left here.
"""

from __future__ import annotations

import functools
from typing import Any

ENV = {
    "RAY_AUTH_MODE": "disabled",  # no token warning / token needed for a local test cluster
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1 on loopback
    "RAY_DEDUP_LOGS": "0",
}
INIT_DEFAULTS: dict[str, Any] = {"address": "local", "num_cpus": 16, "include_dashboard": False}


def apply() -> None:
    """Give every later ``ray.init`` call the defaults it does not set itself (idempotent)."""
    import ray

    original = ray.init
    if getattr(original, "__tq_compat_defaults__", False):
        return

    @functools.wraps(original)
    def init(*args: Any, **kwargs: Any) -> Any:
        for key, value in INIT_DEFAULTS.items():
            if key == "address" and args:
                continue  # the address was given positionally
            kwargs.setdefault(key, value)
        return original(*args, **kwargs)

    init.__tq_compat_defaults__ = True  # type: ignore[attr-defined]
    ray.init = init
