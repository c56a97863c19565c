"""Run one TransferQueue tutorial script as ``__main__`` with the harness's Ray defaults.

Usage: ``python -m compat.tutorial PATH [ARGS...]``; the exit status is the tutorial's.
"""

from __future__ import annotations

import os
import runpy
import sys

from compat import ray_defaults


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m compat.tutorial PATH [ARGS...]")
    path = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(path))  # as when run as ``python PATH``
    ray_defaults.apply()
    runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":
    main()
