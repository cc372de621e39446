"""Start and stop a real ``nats-server`` on a free loopback port, for the NATS tests.

The tests fail (not skip) when the server is missing: ``make test`` installs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def nats_server_path() -> str:
    path = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
    )
    if path is None:
        raise RuntimeError(
            "nats-server is not installed: run 'make test' (it installs it), "
            "or: apt-get install -y nats-server"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """One running nats-server: ``url`` (``nats://127.0.0.1:PORT``), ``stop()``, ``start()``."""

    def __init__(self, config: str = "", port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._config = config
        self._dir = tempfile.mkdtemp(prefix="tether-nats-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [nats_server_path(), "-a", "127.0.0.1", "-p", str(self.port)]
        if self._config:
            conf = os.path.join(self._dir, "server.conf")
            with open(conf, "w") as f:
                f.write(self._config)
            cmd += ["-c", conf]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {cmd}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4) == b"INFO":
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nats-server did not start within 15 s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextmanager
def running(config: str = "") -> Iterator[NatsServer]:
    server = NatsServer(config)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server._dir, ignore_errors=True)
