"""Start `vllm serve` as a real subprocess on 127.0.0.1 for tests and benchmarks."""

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests


def free_port() -> int:
    """A port free now, below the ports the system hands out to outgoing connections
    and to ``bind(0)`` (Linux from 32768, macOS from 49152): between this choice and
    the server binding it (its whole startup), only another server choosing at
    random could take it."""
    for _ in range(100):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000 on 127.0.0.1")


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float, log_tail,
                       headers: dict | None = None) -> None:
    """Until ``url``/health answers 200; an early exit or the timeout raises with the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log_tail()}")
        try:
            if requests.get(url + "/health", timeout=2, headers=headers).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not healthy after {timeout} s: {log_tail()}")


class Server:
    def __init__(self, args: list[str], env: dict | None = None, log_path: Path | None = None,
                 command: list[str] | None = None, cwd: Path | None = None,
                 host: str = "127.0.0.1"):
        self.port = free_port()
        self.host = host
        vllm = Path(sys.executable).with_name("vllm")
        self.command = (command or [str(vllm), "serve"]) + args + [
            "--host", host, "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.log = subprocess.DEVNULL

    @property
    def auth_headers(self) -> dict | None:
        """The --api-key the server was given, as a request header (it guards /health too)."""
        if "--api-key" in self.command:
            return {"Authorization": f"Bearer {self.command[self.command.index('--api-key') + 1]}"}
        return None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 240.0, attempts: int = 3) -> "Server":
        """Start the server and wait until it answers. Where the answer came from another
        server (one that took the port between ``free_port`` and this one's bind), stop
        and start again on another port; the log keeps every attempt."""
        for attempt in range(attempts):
            self._launch(timeout, log_mode="wb" if attempt == 0 else "ab")
            if self._listens():
                return self
            self.stop()
            taken = self.port
            self.port = free_port()
            self.command[self.command.index("--port") + 1] = str(self.port)
        raise RuntimeError(f"port {taken} answered, but not from this server, "
                           f"{attempts} times: {self.tail()}")

    def _launch(self, timeout: float, log_mode: str) -> None:
        self.log = open(self.log_path, log_mode) if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        cwd=self.cwd)
        try:
            wait_until_healthy(self.url, self.process, timeout, self.tail,
                               headers=self.auth_headers)
        except TimeoutError:
            self.stop()
            raise

    def _listens(self) -> bool:
        """Whether this server's process tree holds the listening socket of its port."""
        try:
            root = psutil.Process(self.process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return False
        return any(_holds_listener(process, self.port) for process in tree)

    def tail(self, chars: int = 4000) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        return Path(self.log_path).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGINT (vLLM's graceful shutdown), then SIGKILL for whatever of the
        process tree is left: the API server may move its engine to another group."""
        if self.process is None:
            return
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        if self.log is not subprocess.DEVNULL:
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _holds_listener(process: psutil.Process, port: int) -> bool:
    """Whether ``process`` holds a socket listening on ``port``. On Linux the answer
    comes from the process's own ``/proc/PID/net`` tables: a server started in another
    network namespace (``ip netns exec``) lists its sockets there, not in this one's."""
    proc = Path(f"/proc/{process.pid}")
    if not proc.exists():
        with contextlib.suppress(psutil.Error):
            sockets = getattr(process, "net_connections", process.connections)("inet")
            return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                       for c in sockets)
        return False
    held = set()
    with contextlib.suppress(OSError):
        for fd in (proc / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    held.add(target[len("socket:["):-1])
    return bool(held & _listening_inodes(proc, port))


def _listening_inodes(proc: Path, port: int) -> set[str]:
    """The inodes of the sockets in LISTEN state on ``port`` in ``proc``'s namespace."""
    listen_state = "0A"
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (proc / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == listen_state:
                    inodes.add(fields[9])
    return inodes
