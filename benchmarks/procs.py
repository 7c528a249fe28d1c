"""Child processes: workers with a deadline, and servers bound to 127.0.0.1 on
a free port that are always killed (their whole process group) on exit."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LOCALHOST = "127.0.0.1"


class WorkerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def engine_env(use_mlx: bool, **extra: str) -> dict:
    env = dict(os.environ, VLLM_METAL_USE_MLX="1" if use_mlx else "0", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (engine cores, workers)
    proc.wait()


def run_logged(cmd: list[str], env: dict, log_path: Path, timeout_s: float) -> int:
    """Run ``cmd`` in its own process group, output to ``log_path``; kill it at the deadline."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise WorkerFailed(f"{' '.join(cmd[:4])} ... passed its {timeout_s:.0f} s limit "
                               f"(log: {log_path})") from None
        finally:
            kill_group(proc)


def run_worker(spec: dict, env: dict, log_path: Path, timeout_s: float) -> dict:
    """``python -m benchmarks.worker`` on ``spec``; returns its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        cmd = [PYTHON, "-m", "benchmarks.worker", str(spec_path), str(result_path)]
        code = run_logged(cmd, env, log_path, timeout_s)
        if code != 0 or not result_path.exists():
            raise WorkerFailed(f"worker exited with {code}: {last_lines(log_path)}")
        return json.loads(result_path.read_text())


def last_lines(path: Path, count: int = 3) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(ln.strip()[-200:] for ln in lines[-count:])


def wait_until_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WorkerFailed(f"server exited with {proc.returncode}: {last_lines(log_path)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(1.0)
    raise WorkerFailed(f"server not ready after {timeout_s:.0f} s: {last_lines(log_path)}")


@contextlib.contextmanager
def running_server(cmd: list[str], env: dict, port: int, log_path: Path, ready_timeout_s: float):
    """Start a server, wait for ``/health``, yield its base URL, and always kill it."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        started = time.perf_counter()
        wait_until_ready(proc, f"http://{LOCALHOST}:{port}/health", log_path, ready_timeout_s)
        yield f"http://{LOCALHOST}:{port}", time.perf_counter() - started
    finally:
        kill_group(proc)
