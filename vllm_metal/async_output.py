"""Asynchronous scheduling: the host prepares step n+1 while the device runs step n.

vLLM's engine (``--async-scheduling``) schedules step n+1 before it has read
step n's tokens, and reads them later through an ``AsyncModelRunnerOutput``.
The runner keeps step n's greedy tokens on the device (``InFlightTokens``, held
and settled by ``InFlightSteps``):
step n+1's graph takes its input tokens from there, and the host learns their
values only once step n+1 is issued. Until then a request's host state holds
``PLACEHOLDER`` at that position, as vLLM's scheduler counts it.
"""

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np
from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

PLACEHOLDER = -1


@dataclass
class InFlightTokens:
    """One step's sampled tokens, still on the device."""

    tokens: mx.array  # [num_reqs] int32, one per row of the step's batch
    # req_id -> (index into ``tokens``, position in the request's output tokens)
    slots: dict[str, tuple[int, int]]
    values: list[int] | None = None
    settled: bool = False
    # Set once ``values`` are read; another thread may wait on it.
    settled_event: threading.Event = field(default_factory=threading.Event)

    def read(self) -> list[int]:
        if self.values is None:
            mx.eval(self.tokens)  # waits with the GIL released; tolist would hold it
            self.values = self.tokens.tolist()
        return self.values

    def fill_inputs(self, tokens: np.ndarray, rows: list[tuple[int, str, int, int, int]]) -> mx.array:
        """``tokens`` [B, L] with host placeholders -> the step's input tokens, the
        device's in their place. ``rows``: (row of ``tokens``, req_id, first
        position, query length, prompt length)."""
        at_rows, at_cols, source = [], [], []
        for i, req_id, start, query_len, num_prompt in rows:
            slot = self.slots.get(req_id)
            if slot is None:
                continue
            index, output_position = slot
            column = num_prompt + output_position - start
            if 0 <= column < query_len:
                at_rows.append(i)
                at_cols.append(column)
                source.append(index)
        if not at_rows:
            return mx.array(tokens)
        if (tokens.shape[1] == 1 and at_rows == list(range(len(tokens)))
                and source == list(range(self.tokens.size))):
            # A steady decode step: the last step's tokens as they lie, no array from the
            # host (on MLX's CUDA build its first reader waits for its pages to move).
            return self.tokens.reshape(-1, 1)
        filled = mx.array(tokens)
        filled[mx.array(np.array(at_rows)), mx.array(np.array(at_cols))] = (
            self.tokens[mx.array(np.array(source, np.int32))]
        )
        return filled


class InFlightSteps:
    """The runner's side: the step whose greedy tokens are still on the device,
    launched by ``sample_tokens``, settled before the next step is issued."""

    def __init__(self, batch):
        self.batch = batch  # PersistentBatch: the host's request state
        self.current: InFlightTokens | None = None
        # Set where the runner's MLX work runs on one thread (``mlx_thread``).
        self.mlx_thread = None

    def pending(self) -> InFlightTokens | None:
        """The step in flight whose tokens the host does not know yet."""
        if self.current is None or self.current.settled:
            return None
        return self.current

    def launch(self, logits: mx.array, discard: list[int]) -> tuple[InFlightTokens, list[int]]:
        """Greedy tokens of ``logits`` [num_reqs, vocab], left on the device; the host
        books a placeholder for each row not in ``discard``. Returns the flight and
        the rows that sampled."""
        batch = self.batch.input_batch
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
        mx.async_eval(tokens)
        skip = set(discard)
        rows = [row for row in range(batch.num_reqs) if row not in skip]
        slots = {}
        for row in rows:
            request = self.batch.requests[batch.req_ids[row]]
            slots[request.req_id] = (row, len(request.output_token_ids))
        self.batch.append_sampled([[] if row in skip else [PLACEHOLDER]
                                   for row in range(batch.num_reqs)])
        self.current = InFlightTokens(tokens, slots)
        return self.current, rows

    def settle(self, flight: InFlightTokens | None = None) -> None:
        """Wait for a step in flight (the current one by default) and put its tokens
        where the host keeps them. The next step's forward must not be issued before
        where it scatters into the KV pools: a pool still referenced by a pending
        graph is copied, not updated in place."""
        flight = self.current if flight is None else flight
        if flight is None or flight.settled:
            return
        values = flight.read()
        flight.settled = True
        if self.current is flight:
            self.current = None
        batch, requests = self.batch.input_batch, self.batch.requests
        for req_id, (index, position) in flight.slots.items():
            request = requests.get(req_id)
            output = request.output_token_ids if request is not None else ()
            if position >= len(output) or output[position] != PLACEHOLDER:
                continue  # finished, or its output was cut back (preemption)
            output[position] = values[index]
            row = batch.req_id_to_index.get(req_id)
            if row is not None:
                batch.token_ids_cpu[row, len(request.prompt_token_ids) + position] = values[index]
        flight.settled_event.set()

    def settler(self) -> Callable[[InFlightTokens], None]:
        """How the engine's thread settles a flight: directly in a one-thread runner;
        else the next step's forward settles it on the runner's thread, and where
        none comes first, a settle queued there."""
        if self.mlx_thread is None:
            return self.settle
        return lambda flight: self.mlx_thread.call_unless(flight.settled_event, self.settle,
                                                          flight)


@dataclass
class MetalAsyncOutput(AsyncModelRunnerOutput):
    """A step's output whose tokens the engine reads when it needs them."""

    req_ids: list[str]
    req_id_to_index: dict[str, int]
    rows: list[int]  # batch rows that sampled a real token, each with one slot
    flight: InFlightTokens
    settle: Callable[[InFlightTokens], None]
    prompt_logprobs: dict = field(default_factory=dict)

    def get_output(self) -> ModelRunnerOutput:
        self.settle(self.flight)
        values = self.flight.read()
        sampled: list[list[int]] = [[] for _ in self.req_ids]
        for row in self.rows:
            index, _ = self.flight.slots[self.req_ids[row]]
            sampled[row] = [values[index]]
        return ModelRunnerOutput(
            req_ids=self.req_ids,
            req_id_to_index=self.req_id_to_index,
            sampled_token_ids=sampled,
            prompt_logprobs_dict=self.prompt_logprobs,
        )


@dataclass
class ThreadedOutput(AsyncModelRunnerOutput):
    """A step whose forward and sampling were submitted to the runner's thread
    (``mlx_thread``): the engine reads it when it needs it."""

    forward: Future
    sampled: Future

    def get_output(self) -> ModelRunnerOutput:
        self.forward.result()  # the forward's error, if it failed
        output = self.sampled.result()
        if isinstance(output, AsyncModelRunnerOutput):
            return output.get_output()
        return output
