"""The model's collectives, through mx.distributed.

vLLM numbers ranks ``pp_rank * tp_size + tp_rank`` and keeps its own control plane
(scheduler output to every worker, over gloo and shared memory or TCP). Inside the
model every collective runs on one MLX group spanning all ranks:

- tensor parallel: partial sums of row-parallel layers are all-reduced across the
  ranks of one stage; rank 0 of the stage broadcasts the sampled tokens;
- pipeline parallel: hidden states go from stage k to stage k+1 (same TP rank)
  with send/recv.

MLX's ring backend links each rank to two neighbours and cannot split a group,
so the ranks are laid out on the ring such that every pair that talks is
adjacent (``ring_order``). JACCL connects every pair but cannot split either:
it runs TP alone or PP alone.
"""

import logging
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from vllm_metal.distributed.heartbeat import PeerWatch, answers

logger = logging.getLogger("vllm.metal")


class DistributedError(RuntimeError):
    pass


class LostRankError(DistributedError):
    pass


class BatchMismatchError(DistributedError):
    pass


@dataclass(frozen=True)
class Topology:
    rank: int
    tp_size: int
    pp_size: int

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def rank_at(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    def tp_group(self) -> list[int]:
        return [self.rank_at(self.pp_rank, t) for t in range(self.tp_size)]


def ring_order(tp_size: int, pp_size: int) -> list[int] | None:
    """vLLM ranks in MLX ring order such that TP partners and consecutive stages
    are neighbours; None where two neighbours per rank cannot cover them."""
    if pp_size == 1:
        return list(range(tp_size))  # the TP all-reduce spans the whole ring
    if tp_size == 1:
        return list(range(pp_size))  # stage k talks to k-1 and k+1
    if tp_size == 2 and pp_size == 2:
        return [0, 1, 3, 2]  # 0-1 and 2-3 are TP pairs; 1-3 and 2-0 are pipelines
    return None


def ring_layout_problem(tp_size: int, pp_size: int) -> str | None:
    if ring_order(tp_size, pp_size) is None:
        return (
            f"tensor-parallel-size {tp_size} x pipeline-parallel-size {pp_size} on the ring "
            "backend (a ring links each rank to two neighbours, which covers TP alone, PP "
            "alone and TP=2 x PP=2): use one of those layouts"
        )
    return None


class ModelParallel:
    """The collectives one rank's model and runner use."""

    def __init__(self, topology: Topology, group, mlx_rank_of: dict[int, int],
                 peer_addresses: dict[int, tuple[str, int]], multi_host: bool = False,
                 ranks_on_host: int = 1, local_pids: dict[int, int] | None = None):
        self.topology = topology
        self.multi_host = multi_host
        self.ranks_on_host = ranks_on_host  # ranks sharing this host's memory
        self.local_pids = local_pids or {}  # peers on this host: rank -> pid
        self.group = group
        self.mlx_rank_of = mlx_rank_of
        self.peer_addresses = peer_addresses  # rank -> heartbeat (host, port)
        self.step = 0

    # ---- tensor parallel ---------------------------------------------------
    def tp_all_sum(self, x: mx.array) -> mx.array:
        t = self.topology
        if t.tp_size == 1:
            return x
        if t.pp_size == 1:
            return mx.distributed.all_sum(x, group=self.group)
        # Ring, TP=2 inside a stage: swap partial sums with the partner, one
        # direction at a time (two large sends at once over one socket pair block
        # both ranks), so the graph is evaluated up to here.
        partner = self.mlx_rank_of[t.rank_at(t.pp_rank, 1 - t.tp_rank)]
        self.run(x)
        send = lambda: self.run(mx.distributed.send(x, partner, group=self.group))
        receive = lambda: self.run(mx.distributed.recv_like(x, partner, group=self.group))
        if t.tp_rank == 0:
            send()
            theirs = receive()
        else:
            theirs = receive()
            send()
        return x + theirs

    def tp_broadcast_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Rank 0 of the stage's ``tokens`` (int32) on every rank of the stage."""
        if self.topology.tp_size == 1:
            return tokens
        mine = tokens if self.topology.tp_rank == 0 else np.zeros_like(tokens)
        return np.array(self.run(self.tp_all_sum(mx.array(mine, dtype=mx.int32))))

    # ---- pipeline parallel ------------------------------------------------
    def pp_send(self, x: mx.array) -> mx.array:
        t = self.topology
        return mx.distributed.send(x, self.mlx_rank_of[t.rank + t.tp_size], group=self.group)

    def pp_recv(self, shape, dtype) -> mx.array:
        t = self.topology
        return mx.distributed.recv(shape, dtype, self.mlx_rank_of[t.rank - t.tp_size],
                                   group=self.group)

    # ---- batch agreement --------------------------------------------------
    def check_batch(self, fingerprint: int) -> None:
        """Every rank of the stage must run the batch rank 0 of the stage runs; a
        later stage checks the fingerprint sent along with the activations."""
        self.step += 1
        t = self.topology
        if t.tp_size == 1:
            return
        table = np.zeros((t.tp_size, 2), np.int32)
        table[t.tp_rank] = _split64(fingerprint)
        table = np.array(self.run(self.tp_all_sum(mx.array(table))))
        for tp_rank in range(1, t.tp_size):
            if not np.array_equal(table[tp_rank], table[0]):
                raise BatchMismatchError(self.mismatch_message(
                    t.rank_at(t.pp_rank, tp_rank), compared_with=t.rank_at(t.pp_rank, 0)))

    def mismatch_message(self, rank: int, compared_with: int | None) -> str:
        other = self.topology.rank if compared_with is None else compared_with
        return (
            f"rank {rank} scheduled a different batch than rank {other} at step "
            f"{self.step}: the "
            "workers disagree on the batch, so the engine stops instead of producing wrong "
            "tokens. Restart the engine; if it recurs, check that every host runs the same "
            "vLLM, MLX and vllm-metal versions."
        )

    # ---- evaluation with failure detection ---------------------------------
    def run(self, *arrays):
        """``mx.eval`` a graph holding collectives; a lost peer becomes a clear error."""
        try:
            mx.eval(*arrays)
        except RuntimeError as error:
            if any(mark in str(error).lower() for mark in ("[ring]", "[jaccl]", "connection")):
                raise LostRankError(self.lost_rank_message(error)) from error
            raise
        return arrays[0] if len(arrays) == 1 else arrays

    def lost_rank_message(self, error) -> str:
        lost = [r for r, address in self.peer_addresses.items() if not answers(address)]
        who = (", ".join(f"rank {r} ({self.peer_addresses[r][0]})" for r in lost)
               if lost else "a peer rank")
        return (
            f"rank {self.topology.rank} lost contact with {who} at step {self.step} "
            f"({error}). The engine stops: check that rank's host, then {self.restart_hint}."
        )

    @property
    def restart_hint(self) -> str:
        return ("run python -m vllm_metal.launch again" if self.multi_host
                else "start vllm serve again")

    def watch_peers(self, timeout: float) -> None:
        """From now on, a peer silent for ``timeout`` seconds stops this rank."""
        PeerWatch(self.topology.rank, self.peer_addresses, timeout, self.restart_hint,
                  self.local_pids).start()


def _split64(value: int) -> list[int]:
    value &= (1 << 64) - 1
    hi, lo = value >> 32, value & 0xFFFFFFFF
    return [hi - (1 << 32) if hi >= 1 << 31 else hi, lo - (1 << 32) if lo >= 1 << 31 else lo]
