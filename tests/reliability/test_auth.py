"""Auth: loopback by default; a wider bind needs a token; a token is checked on every port.

The token check is exercised on services bound to 127.0.0.1 with ``auth_token`` set (the check
does not depend on the address), in a ``tq-loader serve`` of its own: requests without the token
or with a wrong one are refused with a typed error, change nothing, and are logged -- on the
controller and on every storage unit.
"""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import torch
from reliability_wire import child_env, describe, request, serve

import tq_loader as tq
from tq_loader import protocol as p
from tq_loader.config import TQConfig
from tq_loader.errors import TQConnectionError
from tq_loader.transport import Server, check_bind, is_loopback

TOKEN = "s3cret-token"


async def _ok(ctx, req, buffers):
    return p.Ok(), []


def _host(address: str) -> str:
    return urlsplit(address).hostname or ""


# ---------------------------------------------------------------------------- binds
def test_everything_binds_to_loopback_by_default() -> None:
    assert TQConfig().host == "127.0.0.1" and TQConfig().auth_token is None
    with serve("storage.num_units=2") as served:
        info = describe(served.address)
        addresses = [info.controller, *info.storage_units]
        assert len(addresses) == 3
        assert all(is_loopback(_host(a)) for a in addresses), addresses


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_a_wider_bind_without_a_token_is_refused_before_binding(host: str) -> None:
    with pytest.raises(ValueError, match="auth_token"):
        check_bind(host, None)
    with pytest.raises(ValueError, match="auth_token"):
        Server(_ok, host=host)  # raises in the constructor: no socket was ever made
    check_bind(host, TOKEN)  # with a token it may bind


def test_loopback_names_are_loopback() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.1", "localhost.example.org"):
        assert not is_loopback(host)


def test_embedded_cluster_on_a_wide_address_without_a_token_does_not_start() -> None:
    tq.close()
    with pytest.raises(ValueError, match="auth_token"):
        tq.init({"host": "0.0.0.0", "storage": {"num_units": 1}})
    assert not tq.is_initialized()


def test_serve_on_a_wide_address_without_a_token_exits_without_serving() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tq_loader", "serve", "--host", "0.0.0.0", "storage.num_units=1"],
        capture_output=True, text=True, timeout=120, env=child_env(),
    )  # fmt: skip
    assert out.returncode != 0
    assert "TQ_LOADER_ADDRESS=" not in out.stdout
    assert "auth_token" in out.stderr


# ---------------------------------------------------------------------------- tokens
@pytest.fixture(scope="module")
def with_token():
    with serve("storage.num_units=2", f"auth_token={TOKEN}") as served:
        yield served


def _ports(served) -> list[str]:
    info = describe(served.address, token=TOKEN)
    return [info.controller, *info.storage_units]


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", "\u00e9\u00e9"])
def test_requests_without_the_token_are_refused_on_every_port(with_token, token) -> None:
    ports = _ports(with_token)
    harmful = {  # what a refused request would change if it were served
        0: p.CreatePartition(partition_id="intruder"),
        1: p.DropPartition(partition_id="guarded"),
        2: p.DropPartition(partition_id="guarded"),
    }
    for i, address in enumerate(ports):
        for body in (p.Stats(), harmful[i]):
            reply, _ = request(address, body, token=token, request_id=77)
            assert reply.id == 77 and reply.body is None
            assert reply.error_kind == "TQConnectionError", reply
            assert "auth token" in reply.error_message
            assert ("missing" if not token else "wrong") in reply.error_message
    reply, _ = request(ports[0], p.ListPartitions(), token=TOKEN)
    assert "intruder" not in reply.body.names


def test_the_right_token_is_served_on_every_port_and_refusals_are_logged(with_token) -> None:
    ports = _ports(with_token)
    for address in ports:
        reply, _ = request(address, p.Stats(), token=TOKEN)
        assert reply.error_kind is None and isinstance(reply.body, (p.ControllerStatsReply, p.UnitStatsReply))
        refused, _ = request(address, p.Stats(), token="wrong")
        assert refused.error_kind == "TQConnectionError"
    # a client with the token works end to end (rows on both units); without it, a typed error
    from tq_loader.client import Client

    good = Client(with_token.address, auth_token=TOKEN)
    try:
        meta = good.put({"x": torch.arange(200.0)}, partition_id="guarded")
        assert good.get_data(meta)["x"].tolist() == torch.arange(200.0).tolist()
    finally:
        good.close()
    bad = Client(with_token.address)
    try:
        with pytest.raises(TQConnectionError, match="auth token"):
            bad.describe()
    finally:
        bad.close()
    log = with_token.stderr()
    assert log.count("refused request") >= len(ports), log  # each port logs its refusals
    assert TOKEN not in log  # the log never shows the secret
