"""Every rank answers heartbeats and watches its peers'.

MLX's ring collectives wait forever on a peer that stopped answering: a process
stopped (SIGSTOP) or hung, or a host whose link went down. A crashed peer closes
its sockets and the collective fails, but a silent one does not. So each rank
serves a heartbeat (a byte, sent by a thread of its own: MLX releases the GIL
while it computes) and, once the model is warm, asks every peer for theirs. A peer
silent for ``VLLM_METAL_PEER_TIMEOUT`` seconds stops this rank with a message that
names it; vLLM's executor turns the lost worker into an engine failure, which
ends every request in flight with an error and stops the server.
"""

import contextlib
import logging
import os
import signal
import socket
import threading
import time

logger = logging.getLogger("vllm.metal")

ANSWER_TIMEOUT_S = 1.0
ROUND_PERIOD_S = 0.5


def serve_heartbeat(host: str) -> int:
    """A port that answers one byte to each connection while this process runs."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, 0))
    server.listen(16)

    def answer_forever():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                conn.sendall(b"\x01")
            except OSError:
                pass
            finally:
                conn.close()

    threading.Thread(target=answer_forever, daemon=True, name="vllm-metal-heartbeat").start()
    return server.getsockname()[1]


def answers(address: tuple[str, int], timeout: float = ANSWER_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(1) == b"\x01"
    except OSError:
        return False


class PeerWatch:
    """A thread that stops this process when a peer has been silent too long."""

    def __init__(self, rank: int, peers: dict[int, tuple[str, int]], timeout: float,
                 restart_hint: str, local_pids: dict[int, int] | None = None):
        self.rank = rank
        self.peers = peers
        self.local_pids = local_pids or {}  # peers on this host: rank -> pid
        self.timeout = timeout
        self.restart_hint = restart_hint
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and self.peers:
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="vllm-metal-peer-watch")
            self._thread.start()

    def _watch(self) -> None:
        heard = {rank: time.monotonic() for rank in self.peers}
        while True:
            for rank, address in self.peers.items():
                if answers(address):
                    heard[rank] = time.monotonic()
                elif time.monotonic() - heard[rank] > self.timeout:
                    self._stop(rank, address, time.monotonic() - heard[rank])
            time.sleep(ROUND_PERIOD_S)

    def message(self, rank: int, address: tuple[str, int], silent_s: float) -> str:
        return (
            f"rank {self.rank} lost contact with rank {rank} ({address[0]}): no heartbeat for "
            f"{silent_s:.0f} s (its process is stopped or hung, or the link to its host is "
            f"down). The engine stops: check that rank's host, then {self.restart_hint} "
            "(VLLM_METAL_PEER_TIMEOUT sets the wait)."
        )

    def _stop(self, rank: int, address: tuple[str, int], silent_s: float) -> None:
        logger.error("vllm-metal: %s", self.message(rank, address, silent_s))
        pid = self.local_pids.get(rank)
        if pid is not None:
            # A stopped process ignores vLLM's SIGTERM and would hold its shutdown
            # for seconds; on this host it can be ended now.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        _stop_engine_process()
        logging.shutdown()
        os._exit(1)


def _stop_engine_process() -> None:
    """The engine may be waiting for the silent rank's output on a socket that its
    own failure handling does not wake (a rank on another host): where this rank
    is the engine process's worker, end the engine too, and the API server fails
    the open requests and exits at once."""
    import psutil

    with contextlib.suppress(psutil.Error):
        parent = psutil.Process().parent()
        if parent is not None and parent.name().startswith(engine_process_title()):
            parent.kill()


def engine_process_title() -> str:
    """The title vLLM gives its engine process (``set_process_title``)."""
    from vllm import envs as vllm_envs

    return f"{vllm_envs.VLLM_PROCESS_NAME_PREFIX}::EngineCore"
