"""``tq-loader serve | status | demo | bench`` (also ``python -m tq_loader``).

``serve`` hosts a cluster (embedded services) in its own process and prints its address, so the
data plane can outlive trainer processes: ``export TQ_LOADER_ADDRESS=...`` and every
``tq.init()`` attaches to it. ``status`` shows a running cluster; ``demo`` runs the GRPO pipeline;
``bench`` the benchmark suite. Errors are one line (``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

__all__ = ["CLIError", "main"]

ENV_ADDRESS = "TQ_LOADER_ADDRESS"  # = tq_loader.api.ENV_ADDRESS (not imported: --help stays light)
ENV_TOKEN = "TQ_LOADER_AUTH_TOKEN"
STATUS_CONNECT_TIMEOUT = 3.0  # s: a status of an unreachable address fails fast
RATE_WINDOW = 0.5  # s between the two snapshots a one-shot status computes rates from


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _load_config(path: str | None, overrides: list[str]) -> Any:
    from omegaconf import OmegaConf

    from tq_loader.config import resolve_config

    conf = OmegaConf.load(path) if path else OmegaConf.create({})
    if overrides:
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(overrides))
    return resolve_config(conf)


def _serve(args: argparse.Namespace) -> int:
    from tq_loader.cluster import EmbeddedCluster
    from tq_loader.transport import is_loopback

    config = _load_config(args.config, args.overrides)
    if args.port is not None:
        config.controller.port = args.port
    if args.host is not None:
        config.host = args.host
    if not config.auth_token and not is_loopback(config.host):
        raise CLIError(
            f"serve --host {config.host}: a non-loopback address needs an auth token; "
            "add auth_token=<secret> (clients then set TQ_LOADER_AUTH_TOKEN) or serve on 127.0.0.1"
        )
    cluster = EmbeddedCluster(config)
    metrics = None
    try:
        if config.metrics.enabled:
            from tq_loader.metrics import start_metrics

            metrics = start_metrics(config.metrics, cluster.address, config.auth_token)
            from tq_loader.client import Client

            with Client(cluster.address, auth_token=config.auth_token) as announcer:
                announcer.announce_metrics(metrics.endpoint)  # attached clients can ask for it
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"TQ_LOADER_ADDRESS={cluster.address}", flush=True)
        if metrics is not None:
            print(f"TQ_LOADER_METRICS_ENDPOINT={metrics.endpoint}", flush=True)
        if args.address_file:
            with open(args.address_file, "w") as f:
                f.write(cluster.address)
        stop.wait()
    finally:
        if metrics is not None:
            metrics.stop()
        cluster.stop()
    return 0


def _status_client(address: str | None) -> Any:
    address = address or os.environ.get(ENV_ADDRESS)
    if not address:
        raise CLIError(
            "no cluster is known: pass --address HOST:PORT (what `tq-loader serve` printed) "
            f"or set {ENV_ADDRESS}"
        )
    if "://" not in address:  # HOST:PORT as people type it
        address = f"tcp://{address}"
    from tq_loader.client import Client
    from tq_loader.config import ClientConfig

    config = ClientConfig(connect_timeout=STATUS_CONNECT_TIMEOUT, request_timeout=2 * STATUS_CONNECT_TIMEOUT)
    client = Client(address, config=config, auth_token=os.environ.get(ENV_TOKEN))
    try:
        client.describe()
    except Exception as exc:
        client.close()
        raise CLIError(f"cannot reach a tq_loader cluster at {address!r}: {_first_line(exc)}") from exc
    return client, address


def _status(args: argparse.Namespace) -> int:
    from tq_loader.app.status import build_view, fetch_picture, plot_partition, render

    client, address = _status_client(args.address)
    try:
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError as exc:
                raise CLIError("--plot needs matplotlib: pip install 'tq-loader[plot]'") from exc
            stats = client.statistics()
            out = plot_partition(fetch_picture(client, stats, args.partition), args.plot)
            print(f"wrote {out}", file=sys.stderr)
            return 0
        interval = args.watch
        earlier, began = client.statistics(), time.monotonic()
        while True:
            wait = interval if interval else RATE_WINDOW
            threading.Event().wait(wait)  # the rate window (an app-level pause, not synchronisation)
            stats, now = client.statistics(), time.monotonic()
            view = build_view(stats, earlier, now - began)
            if args.json:
                print(json.dumps({**stats.to_dict(), "view": view.to_dict()}, indent=2, default=str))
            else:
                from rich.console import Console

                console = Console()
                if interval:
                    console.clear()
                render(view, console, address)
            sys.stdout.flush()
            if not interval:
                return 0
            earlier, began = stats, now
    finally:
        client.close()


def _demo(args: argparse.Namespace) -> int:
    from tq_loader.app.demo import run_demo

    try:
        return run_demo(args.overrides)
    except Exception as exc:
        if type(exc).__module__.startswith(("hydra", "omegaconf")):
            raise CLIError(f"demo: bad override: {_first_line(exc)}") from exc
        raise


def _bench(argv: list[str]) -> int:
    from tq_loader.bench import main as bench_main

    return int(bench_main(argv) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tq-loader", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="host a cluster in this process and print its address")
    serve.add_argument("--config", help="YAML config file (the TQConfig tree)")
    serve.add_argument("--host", help="bind address (non-loopback needs auth_token)")
    serve.add_argument("--port", type=int, help="controller port (default: ephemeral)")
    serve.add_argument("--address-file", help="also write the address to this file")
    serve.add_argument(
        "overrides", nargs="*", help="dotlist overrides, e.g. storage.num_units=4 metrics.enabled=true"
    )
    serve.set_defaults(run=_serve)
    status = sub.add_parser("status", help="show a running cluster: partitions, fields, tasks, units, rates")
    status.add_argument("--address", help=f"controller address (default: ${ENV_ADDRESS})")
    status.add_argument(
        "--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )  # fmt: skip
    status.add_argument("--json", action="store_true", help="the statistics snapshot and the view as JSON")
    status.add_argument("--plot", metavar="OUT.png", help="draw a partition's production and consumption")
    status.add_argument("--partition", help="the partition --plot draws (default: the one with most rows)")
    status.set_defaults(run=_status)
    demo = sub.add_parser("demo", help="run the GRPO pipeline demo on the embedded cluster")
    demo.add_argument("overrides", nargs="*", help="Hydra-style overrides, e.g. demo.prompts=64")
    demo.set_defaults(run=_demo)
    sub.add_parser(
        "bench", help="run the benchmark suite (tq-loader bench --help for its options)", add_help=False
    )
    return parser


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _split_bench(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``[--debug] bench ARGS``: everything after ``bench`` goes to the suite untouched."""
    for i, token in enumerate(argv):
        if token == "bench":
            return argv[:i], argv[i + 1 :]
        if not token.startswith("-"):
            break
    return argv, None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, bench_args = _split_bench(argv)
    debug = "--debug" in head
    try:
        if bench_args is not None:
            return _bench(bench_args)
        args = _parser().parse_args(argv)
        return int(args.run(args) or 0)
    except BrokenPipeError:  # e.g. `tq-loader status --json | head -1`: the reader is gone, not an error
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        return 130
    except CLIError as exc:
        if debug:
            raise
        print(f"tq-loader: error: {exc}", file=sys.stderr)
        return exc.code
    except Exception as exc:
        if debug:
            raise
        from tq_loader.errors import TQError

        code = 2 if isinstance(exc, (TQError, ValueError, TypeError, KeyError, OSError)) else 1
        print(f"tq-loader: error: {type(exc).__name__}: {_first_line(exc)} (--debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return code


if __name__ == "__main__":
    sys.exit(main())
