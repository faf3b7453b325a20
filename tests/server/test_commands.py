"""`rdmapool server` argument handling: tenants from flags, environment and a TOML file; bad input is a
UsageError naming the problem."""

from __future__ import annotations

import pytest

from rdmapool.cli import build_parser
from rdmapool.commands.server import build_config
from rdmapool.errors import UsageError
from tests.support import procs


def parse(*argv: str):
    return build_parser().parse_args(["server", *argv])


def test_tenants_from_flag_env_and_file(tmp_path, monkeypatch) -> None:
    f = tmp_path / "tenants.toml"
    f.write_text('[tenants.carol]\ntoken = "carol-token-xyz"\nquota = "2MiB"\n')
    monkeypatch.setenv("RDMAPOOL_TENANTS", "bob:bob-token-123:1MiB")
    cfg = build_config(parse("--tenant", "alice:alice-token-1:64MiB", "--tenants-file", str(f),
                             "--size-classes", "64KiB,1MiB", "--listen", "127.0.0.1:0", "--ttl-s", "5"))
    assert [(t.name, t.quota) for t in cfg.tenants] == [("alice", 64 << 20), ("bob", 1 << 20), ("carol", 2 << 20)]
    assert cfg.size_classes == (64 << 10, 1 << 20) and cfg.ttl_s == 5.0 and cfg.port == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tenant", "alice:short:1MiB"], "at least 8"),
        (["--tenant", "alice:token-123456"], "NAME:TOKEN:QUOTA"),
        (["--tenant", "a:token-123456:lots"], "cannot read size"),
        ([], "at least one tenant"),
        (["--tenant", "a:token-123456:1MiB", "--size-classes", "1MiB,64KiB"], "increasing"),
        (["--tenant", "a:token-123456:1MiB", "--listen", "host:notaport"], "HOST:PORT"),
    ],
)
def test_bad_arguments_name_the_problem(argv: list[str], message: str, monkeypatch) -> None:
    monkeypatch.delenv("RDMAPOOL_TENANTS", raising=False)
    with pytest.raises(UsageError, match=message):
        build_config(parse(*argv))


def test_policy_options_reach_the_policy(monkeypatch) -> None:
    from rdmapool.server.core import PoolCore
    from rdmapool.transport.base import RegionDescriptor

    monkeypatch.delenv("RDMAPOOL_TENANTS", raising=False)
    cfg = build_config(parse("--tenant", "a:token-123456:1MiB", "--size-classes", "64KiB", "--policy", "ttl",
                             "--policy-option", "ttl=600", "--policy-option", "refresh=false"))
    assert cfg.policy_options == {"ttl": 600, "refresh": False}
    core = PoolCore(cfg, {"a": RegionDescriptor(0x10000, 1 << 20, 1)})
    (cls,) = core.tenants["a"].classes
    assert (cls.policy.name, cls.policy.ttl, cls.policy.refresh) == ("ttl", 600.0, False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "ttl", "--policy-option", "horizon=5"], "bad options for policy 'ttl'"),
        (["--policy", "ttl", "--policy-option", "ttl"], "KEY=VALUE"),
        (["--policy", "ttl", "--policy-option", "ttl=-1"], "ttl must be > 0"),
        (["--policy", "nonesuch"], "unknown eviction policy 'nonesuch'"),
    ],
)
def test_bad_policy_options_name_the_problem(argv: list[str], message: str, monkeypatch) -> None:
    monkeypatch.delenv("RDMAPOOL_TENANTS", raising=False)
    with pytest.raises(UsageError, match=message):
        build_config(parse("--tenant", "a:token-123456:1MiB", *argv))


@pytest.mark.parametrize("body", ['tenants = "x"', "tenants = [1]"])
def test_a_malformed_tenants_file_names_the_problem(body: str, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("RDMAPOOL_TENANTS", raising=False)
    f = tmp_path / "tenants.toml"
    f.write_text(body + "\n")
    with pytest.raises(UsageError, match="'tenants' must be a table"):
        build_config(parse("--tenants-file", str(f)))


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
@pytest.mark.parametrize("option", ["--lease-s", "--grace-s", "--reservation-s", "--ttl-s", "--idle-ttl-s"])
def test_times_must_be_finite(option: str, value: str, monkeypatch) -> None:
    """A grace of nan never ends: retired slots would never come back (seen: free slots ran out)."""
    monkeypatch.delenv("RDMAPOOL_TENANTS", raising=False)
    with pytest.raises(UsageError, match=f"{option[2:].replace('-', '_')} must be a finite number"):
        build_config(parse("--tenant", "a:token-123456:1MiB", option, value))


def _serve(*argv: str) -> int:
    from rdmapool.cli import main

    return main(["server", "--tenant", "a:token-123456:1MiB", "--size-classes", "64KiB", *argv])


def test_start_up_failures_are_one_line_errors(capsys) -> None:
    """What operators get wrong at start (a port in use, an address not on this host, a quota the host cannot
    hold) is exit status 2 and one line naming it, not a traceback."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert _serve("--listen", f"127.0.0.1:{port}") == 2
        assert f"rdmapool server: cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
        assert _serve("--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}") == 2
        assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    assert _serve("--listen", "192.0.2.1:0") == 2  # TEST-NET-1: never an address of this host
    assert "cannot start the tcp transport on 192.0.2.1: Cannot assign requested address" in capsys.readouterr().err
    from rdmapool.cli import main

    assert main(["server", "--tenant", "a:token-123456:100TiB", "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert "the tenants' quotas total 109951162777600 bytes (102400.0 GiB), more than the" in err
    assert "Traceback" not in err


def test_a_wildcard_listen_address_is_never_advertised(monkeypatch) -> None:
    """0.0.0.0 is where a server listens, not an address a client on another host can connect to."""
    import ipaddress

    monkeypatch.delenv("RDMAPOOL_TENANTS", raising=False)
    cfg = build_config(parse("--tenant", "a:token-123456:1MiB", "--listen", "0.0.0.0:7400"))
    assert cfg.host == "0.0.0.0" and cfg.advertise not in ("0.0.0.0", "")
    ipaddress.ip_address(cfg.advertise)  # an address, as the default route's source or the hostname's
    assert cfg.transport_options == {"host": "0.0.0.0", "advertise": cfg.advertise}
    cfg = build_config(parse("--tenant", "a:token-123456:1MiB", "--listen", "0.0.0.0:7400",
                             "--advertise", "pool-7.example"))
    assert cfg.advertise == "pool-7.example" and cfg.transport_options["advertise"] == "pool-7.example"
    cfg = build_config(parse("--tenant", "a:token-123456:1MiB", "--listen", "127.0.0.1:7400"))
    assert cfg.advertise == "127.0.0.1"


def test_a_server_listening_everywhere_tells_clients_the_advertised_address() -> None:
    from rdmapool.client import PoolClient, PutStatus
    from rdmapool.config import ClientConfig
    from tests.support import procs

    server = procs.start("tcp", "1MiB", "0.0.0.0:0", "--size-classes", "64KiB", "--advertise", "127.0.0.1")
    try:
        assert server.info["host"] == "127.0.0.1" and server.address.startswith("127.0.0.1:")
        assert server.info["peer_info"]["host"] == "127.0.0.1"
        cfg = ClientConfig(token=procs.TOKENS["a"], staging_bytes=1 << 20, request_timeout_s=5.0)
        with PoolClient([server.address], cfg, transport_name="tcp") as c:
            assert c.put([b"k" * 16], [b"v" * 100]) == [PutStatus.STORED]
            buf = bytearray(100)
            assert c.get([b"k" * 16], [buf]) == [100] and bytes(buf) == b"v" * 100
    finally:
        procs.stop(server)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--capacity", "abc"], "--capacity needs --etcd"),
        (["--replicas", "0", "--member-ttl", "0"], "--member-ttl, --replicas need --etcd"),
        (["--etcd", "127.0.0.1:2379", "--member-ttl", "0"], "--member-ttl must be >= 2"),
        (["--etcd", "127.0.0.1:2379", "--capacity", "abc"], "cannot read size"),
        (["--size-classes", ""], "--size-classes is empty"),
        (["--transport", "shm", "--data-port", "7401"], "transport 'shm' has none"),
        (["--data-port", "70000"], "--data-port must be a port number"),
        (["--listen", "no-such-host.invalid:0"], "does not resolve to an IPv4 address"),
    ],
)
def test_flags_that_cannot_apply_are_refused(argv: list[str], message: str, monkeypatch) -> None:
    monkeypatch.delenv("RDMAPOOL_TENANTS", raising=False)
    with pytest.raises(UsageError, match=message):
        build_config(parse("--tenant", "a:token-123456:1MiB", *argv))


def test_the_tcp_data_port_can_be_fixed() -> None:
    """--data-port: the tcp data engine listens there (a firewall can name it), and clients learn it in hello."""
    srv = procs.start("tcp", "8MiB", "127.0.0.1:0", "--data-port", "0")
    try:
        free = srv.info["peer_info"]["port"]
    finally:
        procs.stop(srv)
    srv = procs.start("tcp", "8MiB", "127.0.0.1:0", "--data-port", str(free))
    try:
        assert srv.info["peer_info"]["port"] == free
    finally:
        procs.stop(srv)


def test_a_host_name_listens_on_its_address(monkeypatch) -> None:
    monkeypatch.delenv("RDMAPOOL_TENANTS", raising=False)
    cfg = build_config(parse("--tenant", "a:token-123456:1MiB", "--listen", "localhost:0"))
    assert cfg.host == "127.0.0.1" and cfg.advertise == "127.0.0.1"


def test_a_size_class_that_gets_no_slot_is_reported(caplog) -> None:
    import logging

    from rdmapool.config import ServerConfig, TenantConfig
    from rdmapool.server import MemoryServer

    cfg = ServerConfig(tenants=(TenantConfig("a", "token-123456", 4 << 20),), size_classes=(64 << 10, 32 << 20),
                       transport="tcp")
    with caplog.at_level(logging.WARNING, logger="rdmapool.server.driver"), MemoryServer(cfg) as srv:
        assert [c.layout.capacity for c in srv.core.tenants["a"].classes] == [64 << 10]
    assert "tenant a: size classes 32MiB get no slot in its 4MiB quota" in caplog.text


def test_an_in_process_server_listening_everywhere_advertises_a_real_address() -> None:
    from rdmapool.config import ServerConfig, TenantConfig
    from rdmapool.server import MemoryServer

    cfg = ServerConfig(tenants=(TenantConfig("a", "token-123456", 1 << 20),), size_classes=(64 << 10,),
                       host="0.0.0.0", transport="tcp", transport_options={"host": "0.0.0.0"})
    with MemoryServer(cfg) as srv:
        assert srv.info.host not in ("0.0.0.0", "") and srv.info.peer_info["host"] == srv.info.host
