"""``tq-loader serve | status | demo | bench``.

``serve`` hosts a cluster (embedded services) in its own process and prints its address, so the
data plane can outlive trainer processes: ``export TQ_LOADER_ADDRESS=...`` and every
``tq.init()`` attaches to it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

__all__ = ["main"]


def _load_config(path: str | None, overrides: list[str]) -> Any:
    from omegaconf import OmegaConf

    from tq_loader.config import resolve_config

    conf = OmegaConf.load(path) if path else OmegaConf.create({})
    if overrides:
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(overrides))
    return resolve_config(conf)


def _serve(args: argparse.Namespace) -> int:
    from tq_loader.cluster import EmbeddedCluster

    config = _load_config(args.config, args.overrides)
    if args.port is not None:
        config.controller.port = args.port
    if args.host is not None:
        config.host = args.host
    cluster = EmbeddedCluster(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"TQ_LOADER_ADDRESS={cluster.address}", flush=True)
    if args.address_file:
        with open(args.address_file, "w") as f:
            f.write(cluster.address)
    try:
        stop.wait()
    finally:
        cluster.stop()
    return 0


def _status(args: argparse.Namespace) -> int:
    import tq_loader as tq
    from tq_loader.app.status import render_statistics

    if args.address:
        tq.connect(args.address)
    else:
        tq.init()
    stats = tq.statistics()
    if args.json:
        print(json.dumps(stats.to_dict() if hasattr(stats, "to_dict") else stats, indent=2, default=str))
    else:
        render_statistics(stats)
    tq.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tq_loader.app.demo import run_demo

    return run_demo(args.overrides)


def _bench(args: argparse.Namespace) -> int:
    import runpy

    sys.argv = ["benchmarks.run", *args.overrides]
    runpy.run_module("benchmarks.run", run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tq-loader", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="host a cluster in this process and print its address")
    serve.add_argument("--config", help="YAML config file (the TQConfig tree)")
    serve.add_argument("--host", help="bind address (non-loopback needs auth_token)")
    serve.add_argument("--port", type=int, help="controller port (default: ephemeral)")
    serve.add_argument("--address-file", help="also write the address to this file")
    serve.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. storage.num_units=4")
    serve.set_defaults(run=_serve)
    status = sub.add_parser("status", help="print the statistics of a running cluster")
    status.add_argument("--address", help="controller address (default: TQ_LOADER_ADDRESS)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=_status)
    demo = sub.add_parser("demo", help="run the GRPO pipeline demo on the embedded cluster")
    demo.add_argument("overrides", nargs="*", help="Hydra-style overrides, e.g. demo.prompts=64")
    demo.set_defaults(run=_demo)
    bench = sub.add_parser("bench", help="run the benchmark suite")
    bench.add_argument("overrides", nargs="*")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
