"""A second OS process for the KV client tests: writes its values, then reads and checks a peer's.

Run as ``python kv_peer.py BACKEND CONFIG_JSON MINE THEIRS COUNT NBYTES``; exits 0 when every
value of ``THEIRS`` (written by the other process) arrived intact within the deadline.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def value(prefix: str, i: int, nbytes: int) -> np.ndarray:
    """The deterministic value number ``i`` of writer ``prefix``."""
    seed = sum(prefix.encode()) * 1000 + i
    return np.random.default_rng(seed).integers(0, 255, nbytes, dtype=np.uint8)


def make_client(backend: str, config: dict) -> object:
    if backend == "mooncake":
        from tq_loader.storage.mooncake import MooncakeConfig, MooncakeKVClient

        return MooncakeKVClient(MooncakeConfig(**config))
    from tq_loader.storage.yuanrong import YuanrongConfig, YuanrongKVClient

    return YuanrongKVClient(YuanrongConfig(**config))


def main() -> int:
    backend, config, mine, theirs, count, nbytes = sys.argv[1:7]
    count, nbytes = int(count), int(nbytes)
    client = make_client(backend, json.loads(config))
    from tq_loader.errors import NotFoundError

    client.put([f"{mine}/{i}" for i in range(count)], [value(mine, i, nbytes) for i in range(count)])
    keys = [f"{theirs}/{i}" for i in range(count)]
    deadline = time.monotonic() + 60
    while True:
        try:
            got = client.get(keys)
            break
        except NotFoundError:
            if time.monotonic() > deadline:
                print(f"{mine}: the peer's values never arrived", file=sys.stderr)
                return 2
            time.sleep(0.05)
    for i, view in enumerate(got):
        if not np.array_equal(np.frombuffer(view, dtype=np.uint8), value(theirs, i, nbytes)):
            print(f"{mine}: value {i} of {theirs} differs", file=sys.stderr)
            return 3
    del got
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
