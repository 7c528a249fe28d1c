"""Scheduler output in, sampled tokens out: the step's orchestration.

Setup: the model as this rank runs it (``model_setup``), the KV cache vLLM's
manager sizes (``kv_layout``), compiled decode steps traced before requests come.

One step: the persistent batch (``persistent_batch``) folds in the scheduler's
decisions; ``plan_groups`` splits the scheduled requests into forward groups
(all single-token decodes together, prompt chunks of like length padded
together: ``forward_groups``); each group runs one MLX forward on the paged
cache (a compiled graph for decodes: ``attention/decode_graph``);
``sample_tokens`` hands the logits to vLLM's own torch ``Sampler``
(``sampling``), or leaves greedy tokens on the device for the next step
(``async_output``), and books the results, prompt logprobs
(``prompt_logprobs``) and n-gram drafts (``drafts``) included.

Under tensor parallelism every rank runs the same groups on its shard of the
model and rank 0 of the stage samples and broadcasts the tokens. Under pipeline
parallelism a stage runs its layers and hands the hidden states on; earlier
stages learn the sampled tokens from the scheduler's next output. Every rank
checks that it runs the batch its stage's rank 0 runs (``PersistentBatch.fingerprint``).
"""

import logging
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, DraftTokenIds, ModelRunnerOutput
from vllm.v1.sample.logits_processor import build_logitsprocs
from vllm.v1.sample.sampler import Sampler
from vllm.v1.structured_output.utils import apply_grammar_bitmask
from vllm.v1.worker.gpu_input_batch import InputBatch

from vllm_metal import envs
from vllm_metal.async_output import InFlightSteps, MetalAsyncOutput
from vllm_metal.attention.decode_graph import DecodeGraphs
from vllm_metal.attention.paged import BatchPlan, PagedKVCache
from vllm_metal.drafts import NgramDrafts
from vllm_metal.forward_groups import ForwardGroup, plan_groups
from vllm_metal.kv_layout import KVLayout
from vllm_metal.models import gemv
from vllm_metal.models.adapter import CausalLM
from vllm_metal.model_setup import RankModel, load_rank_model
from vllm_metal.persistent_batch import PersistentBatch
from vllm_metal.prompt_logprobs import PromptLogprobs
from vllm_metal.sampling import (decode_sampled, encode_sampled, first_position_masks,
                                 sample_with_vllm)

logger = logging.getLogger("vllm.metal")

CPU = torch.device("cpu")


@dataclass
class StepState:
    """What ``execute_model`` leaves for ``sample_tokens``."""

    scheduler_output: object
    logits: mx.array  # [num_reqs, vocab], batch order
    prompt_logits: dict[str, mx.array] = field(default_factory=dict)  # [chunk, vocab]
    draft_checks: dict[int, mx.array] = field(default_factory=dict)  # row -> argmax per draft slot
    timings: dict[str, float] = field(default_factory=dict)
    forwards: int = 0  # padded forwards the step ran (``forward_groups``)


class MetalModelRunner:
    def __init__(self, vllm_config, model_parallel=None):
        self.vllm_config = vllm_config
        self.parallel = model_parallel  # ModelParallel, or None for one rank
        parallel_config = vllm_config.parallel_config
        self.tp_size = parallel_config.tensor_parallel_size
        self.pp_size = parallel_config.pipeline_parallel_size
        topology = model_parallel.topology if model_parallel is not None else None
        self.tp_rank = topology.tp_rank if topology else 0
        self.pp_rank = topology.pp_rank if topology else 0
        self.is_last_stage = self.pp_rank == self.pp_size - 1
        self.samples = self.is_last_stage and self.tp_rank == 0
        self.reports_output = self.samples  # vLLM reads the outputs of this rank only
        self.model_config = vllm_config.model_config
        self.cache_config = vllm_config.cache_config
        self.scheduler_config = vllm_config.scheduler_config
        self.max_num_reqs = self.scheduler_config.max_num_seqs
        self.max_model_len = self.model_config.max_model_len
        self.block_size = self.cache_config.block_size
        self.kv_layout = KVLayout.of(vllm_config)

        self.prompt_logprobs = PromptLogprobs()
        self.batch = PersistentBatch(self.prompt_logprobs, self.is_last_stage)
        self.requests = self.batch.requests
        self.sampler = Sampler(logprobs_mode=self.model_config.logprobs_mode)
        self.model: CausalLM | None = None
        self.rank_model: RankModel | None = None  # the model and what loading it decided
        self.kv_cache: PagedKVCache | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.input_batch: InputBatch | None = None
        self.step_state: StepState | None = None
        # Asynchronous scheduling: the last step's greedy tokens, still on the device.
        self.async_scheduling = bool(self.scheduler_config.async_scheduling)
        self.in_flight = InFlightSteps(self.batch)
        self.debug = envs.VLLM_METAL_DEBUG
        self.batch_prompts = envs.VLLM_METAL_BATCH_PROMPTS
        self.drafts = NgramDrafts(vllm_config, proposes=self.samples)
        self.num_spec_tokens = self.drafts.num_spec_tokens

    # ---- setup -------------------------------------------------------------
    def load_model(self) -> None:
        self.rank_model = load_rank_model(self.vllm_config, self.parallel, self.tp_rank,
                                          self.pp_rank)
        self.model = self.rank_model.model

    def kv_layer_names(self) -> list[str]:
        return [f"model.layers.{i}.self_attn" for i in self.rank_model.stage_layers]

    def get_kv_cache_spec(self) -> dict[str, FullAttentionSpec]:
        return self.kv_layout.spec(self.kv_layer_names())

    def kv_bytes_per_block(self) -> int:
        return self.kv_layout.bytes_per_block(len(self.rank_model.stage_layers))

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig) -> None:
        num_blocks = kv_cache_config.num_blocks
        start = time.perf_counter()
        loaded = self.rank_model
        self.kv_cache = self.kv_layout.allocate(num_blocks, self.model.num_layers,
                                                loaded.stage_layers)
        allocated_in = time.perf_counter() - start
        # Compiled decode steps: one rank (collectives stay outside traced graphs),
        # unless --enforce-eager.
        self.decode_graphs = None
        # A traced step would keep the adapter slots it was traced with: LoRA runs eager.
        if self.parallel is None and not self.model_config.enforce_eager and loaded.adapters is None:
            self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, loaded.layer_windows,
                                              loaded.grouped_mask, loaded.paged_kernel,
                                              fused_blocks=loaded.fused_blocks > 0)
        self.input_batch = InputBatch(
            max_num_reqs=self.max_num_reqs,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=self.scheduler_config.max_num_batched_tokens,
            device=CPU,
            vocab_size=self.model_config.get_vocab_size(),
            block_sizes=[self.block_size],
            max_num_blocks_per_req=[-(-self.max_model_len // self.block_size)],
            logitsprocs=build_logitsprocs(self.vllm_config, CPU, False, False,
                                          self.model_config.logits_processors or ()),
            logitsprocs_need_output_token_ids=bool(self.model_config.logits_processors),
            num_spec_tokens=self.num_spec_tokens,
            is_pooling_model=False,
        )
        self.batch.input_batch = self.input_batch
        logger.info("KV cache: %s, allocated in %.2f s",
                    self.kv_layout.describe(num_blocks, loaded.stage_layers), allocated_in)

    def warm_up(self) -> None:
        """One single-token forward into the null block (block 0, never handed to
        requests), so the first request does not pay for MLX's first-call setup; a
        prompt forward at each row count that launches a linear kernel of its own
        (``gemv.warm_up_rows``, compiled at first launch); then the compiled decode
        step of each batch bucket, traced before any request waits."""
        self._null_block_forward(1)
        rows = gemv.warm_up_rows(self.model.model)
        if rows:
            start = time.perf_counter()
            for tokens in rows:
                self._null_block_forward(tokens)
            logger.info("Prompt forwards of %s tokens run at startup in %.2f s (the linear "
                        "kernels' variants for those rows compiled)",
                        ", ".join(map(str, rows)), time.perf_counter() - start)
        if self.decode_graphs is not None:
            start = time.perf_counter()
            traced = self.decode_graphs.warm_up(self.max_num_reqs)
            if traced:
                logger.info("Decode steps traced and run for %s rows (%d blocks read) in %.2f s "
                            "(--enforce-eager: no compiled steps)",
                            ", ".join(str(rows) for rows, _ in traced), traced[0][1],
                            time.perf_counter() - start)

    def _null_block_forward(self, tokens: int) -> None:
        blocks = -(-tokens // self.block_size)
        plan = BatchPlan.build(np.zeros((1, blocks), np.int32), [0], [tokens], self.block_size,
                               self.kv_layout.num_kv_heads, entries=self.kv_layout.entries)
        hidden = self.model.hidden_states(mx.zeros((1, tokens), mx.int32),
                                          self.kv_cache.layer_views(plan))
        self._evaluate(self._stage_result(hidden[:, -1]))

    # ---- step: forward -----------------------------------------------------
    def execute_model(self, scheduler_output):
        t0 = time.perf_counter()
        self.batch.update(scheduler_output)
        if scheduler_output.total_num_scheduled_tokens == 0 or self.input_batch.num_reqs == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        if self.parallel is not None:
            self._check_batch(scheduler_output)
        t1 = time.perf_counter()
        groups = self.plan_groups(scheduler_output.num_scheduled_tokens)
        if not self.is_last_stage:
            for group in groups:
                self._evaluate(self._run_group(group, {}, {}))
            self.step_state = StepState(scheduler_output, None)
            return None
        rows_logits, prompt_logits, draft_checks = [], {}, {}
        wait_first = self._needs_last_step_first(groups)
        for i, group in enumerate(groups):
            logits = self._run_group(group, prompt_logits, draft_checks)
            rows_logits.append((group.rows, logits))
            if i == 0:
                # The graph is built; wait for the last step here where this one
                # may not be issued before it ends (see below).
                t_built = time.perf_counter()
                if wait_first:
                    self.in_flight.settle()
                t_settled = time.perf_counter()
            # Each group must finish before the next writes the same KV pools:
            # a pool still referenced by a pending graph would be copied, not updated.
            if i + 1 < len(groups) or self.parallel is not None:
                self._evaluate(logits, prompt_logits, draft_checks)
            else:
                mx.async_eval(logits, prompt_logits, draft_checks)
        t_issued = time.perf_counter()
        self.in_flight.settle()  # the host learns the last step's tokens
        waited = (t_settled - t_built) + (time.perf_counter() - t_issued)
        # Groups run their rows in their own order (a padded group: longest first).
        order = np.argsort(np.concatenate([rows for rows, _ in rows_logits]))
        logits = mx.concatenate([lg for _, lg in rows_logits], axis=0)
        if np.any(order != np.arange(len(order))):
            logits = logits[mx.array(order)]
        self.step_state = StepState(
            scheduler_output, logits, prompt_logits, draft_checks,
            {"prepare": t1 - t0, "build": t_built - t1, "wait_last": waited,
             "forward_issue": t_issued - t1 - (t_settled - t_built)},
            forwards=len(groups),
        )
        return None

    def plan_groups(self, num_scheduled: dict[str, int]) -> list[ForwardGroup]:
        batch = self.input_batch
        return plan_groups([
            # A decode: the last token plus any drafts to verify.
            (row, num_scheduled[req_id], int(batch.num_computed_tokens_cpu[row]),
             num_scheduled[req_id] == 1 + len(batch.spec_token_ids[row])
             and not self.prompt_logprobs.wants(req_id))
            for row, req_id in enumerate(batch.req_ids)],
            batch.block_table[0].get_numpy_array(), self.block_size, self.batch_prompts)

    def _run_group(self, group: ForwardGroup, prompt_logits: dict, draft_checks: dict) -> mx.array:
        """One padded forward. Returns logits at each request's sampling position:
        its last token, or with draft tokens the token before them (a draft is
        kept only where it equals the argmax of the position before it)."""
        batch = self.input_batch
        rows = np.array(group.rows)
        qlens = np.array(group.query_lens)
        L = int(qlens.max())
        tokens = np.zeros((len(rows), L), dtype=np.int32)
        for i, row in enumerate(group.rows):
            start = group.starts[i]
            tokens[i, : qlens[i]] = batch.token_ids_cpu[row, start : start + qlens[i]]
        pending = self.in_flight.pending()
        if pending is None:
            tokens = mx.array(tokens)
        else:
            tokens = pending.fill_inputs(tokens, [
                (i, batch.req_ids[row], group.starts[i], int(qlens[i]),
                 int(batch.num_prompt_tokens[row]))
                for i, row in enumerate(group.rows)])
        block_table = batch.block_table[0].get_numpy_array()[rows]
        loaded = self.rank_model
        if loaded.adapters is not None:
            loaded.adapters.activate([int(batch.request_lora_mapping[row]) for row in group.rows],
                                     batch.lora_id_to_lora_request)
        if self._takes_decode_graph(group):
            return self.decode_graphs.logits(tokens, block_table, np.asarray(group.starts))
        plan = BatchPlan.build(block_table, group.starts, qlens, self.block_size,
                               self.kv_layout.num_kv_heads, loaded.grouped_mask,
                               self.kv_layout.entries)
        plan.use_kernel = loaded.paged_kernel
        hidden = self.model.hidden_states(tokens, self.kv_cache.layer_views(plan))
        if not self.is_last_stage:
            return loaded.handoff.take_pending()
        num_drafts = np.array([len(batch.spec_token_ids[row]) for row in group.rows])
        sample_at = hidden[mx.arange(len(rows)), mx.array(qlens - 1 - num_drafts)]
        for i, row in enumerate(group.rows):
            req_id = batch.req_ids[row]
            if not self.samples:
                break  # only the sampling rank uses prompt logits and draft checks
            if self.prompt_logprobs.wants(req_id):
                prompt_logits[req_id] = self.model.logits(hidden[i, : qlens[i]])
            if num_drafts[i]:
                verify = hidden[i, qlens[i] - 1 - num_drafts[i] : qlens[i]]
                draft_checks[row] = mx.argmax(self.model.logits(verify), axis=-1)
        return self.model.logits(sample_at)

    def _takes_decode_graph(self, group: ForwardGroup) -> bool:
        return (self.decode_graphs is not None and max(group.query_lens) == 1
                and not any(self.prompt_logprobs.wants(self.input_batch.req_ids[row])
                            for row in group.rows))

    def _needs_last_step_first(self, groups: list[ForwardGroup]) -> bool:
        """Whether this step's forward must wait for the step in flight before it is
        issued: a step that scatters into the pools must (a pool that a pending step
        still holds would be copied whole); one whose pools are written in place
        (a compiled decode step with the CUDA kernels) need not."""
        return not (len(groups) == 1 and self._takes_decode_graph(groups[0])
                    and self.decode_graphs.writes_in_place)

    def _stage_result(self, hidden_rows: mx.array):
        """What a forward ends in: logits on the last stage, the pending send before it."""
        if self.is_last_stage:
            return self.model.logits(hidden_rows)
        return self.rank_model.handoff.take_pending()

    def _evaluate(self, *arrays) -> None:
        if self.parallel is None:
            mx.eval(*arrays)
        else:
            self.parallel.run(*arrays)

    # ---- step: batch agreement ---------------------------------------------
    def _check_batch(self, scheduler_output) -> None:
        """Stop with an error naming the rank, never run diverging batches: every rank
        of a stage compares with the stage's rank 0; a later stage compares with
        the fingerprint the stage before it sends ahead of its activations."""
        from vllm_metal.distributed.parallel import BatchMismatchError, _split64

        fingerprint = self.batch.fingerprint(scheduler_output)
        self.parallel.check_batch(fingerprint)
        mine = np.array(_split64(fingerprint), np.int32)
        if self.pp_rank > 0:
            theirs = np.array(self.parallel.run(self.parallel.pp_recv((2,), mx.int32)))
            if not np.array_equal(theirs, mine):
                sender = self.parallel.topology.rank - self.tp_size
                raise BatchMismatchError(self.parallel.mismatch_message(sender, compared_with=None))
        if not self.is_last_stage:
            self.parallel.run(self.parallel.pp_send(mx.array(mine)))

    # ---- step: sampling ----------------------------------------------------
    def sample_tokens(self, grammar_output) -> ModelRunnerOutput | None:
        state = self.step_state
        if state is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        self.step_state = None
        if not self.is_last_stage:
            self.prompt_logprobs.finish(state.scheduler_output, self.requests)
            return None
        if not self.samples:
            return self._receive_samples(state)
        t0 = time.perf_counter()
        batch = self.input_batch
        discard = self.batch.rows_still_in_prefill(state.scheduler_output)
        plain_greedy = grammar_output is None and self._batch_is_plain_greedy()
        if plain_greedy and self.async_scheduling:
            return self._sample_in_flight(state, discard)
        if plain_greedy:
            # Argmax in MLX: no vocabulary-sized copy to torch, same tokens.
            sampled = [[t] for t in mx.argmax(state.logits, axis=-1).tolist()]
            output = None
            t1 = time.perf_counter()
        else:
            logits = torch.from_numpy(np.array(state.logits.astype(mx.float32)))
            t1 = time.perf_counter()
            if grammar_output is not None:
                apply_grammar_bitmask(*first_position_masks(state.scheduler_output,
                                                            grammar_output), batch, logits)
            output = sample_with_vllm(self.sampler, logits, batch, discard)
            sampled = output.sampled_token_ids.tolist()
        for row in discard:
            sampled[row] = []
        self.drafts.accept(sampled, state.draft_checks, batch, self.requests)
        if self.tp_size > 1:
            self.parallel.tp_broadcast_tokens(encode_sampled(sampled, 1 + self.num_spec_tokens))
        self.batch.append_sampled(sampled)
        self.drafts.propose(sampled, state.scheduler_output, batch)
        prompt_logprobs = self.prompt_logprobs.collect(state.prompt_logits, self.requests,
                                                       self.sampler)
        self.prompt_logprobs.finish(state.scheduler_output, self.requests)
        result = ModelRunnerOutput(
            req_ids=list(batch.req_ids),
            req_id_to_index=dict(batch.req_id_to_index),
            sampled_token_ids=sampled,
            logprobs=(output.logprobs_tensors.tolists()
                      if output is not None and output.logprobs_tensors is not None else None),
            prompt_logprobs_dict=prompt_logprobs,
        )
        if self.debug:
            state.timings.update(forward_wait=t1 - t0, sample=time.perf_counter() - t1)
            self._log_step(state, async_step=False)
        return result

    def _log_step(self, state: StepState, async_step: bool) -> None:
        """VLLM_METAL_DEBUG's line per step. ``build``: the host's graph building;
        ``wait last``: waiting for the step in flight (asynchronous scheduling);
        ``forward issue``: host time to build and issue this step's forward (``build``
        included);
        ``forward wait``: waiting for it (synchronous steps only)."""
        timings = ", ".join(f"{name.replace('_', ' ')} {value * 1e3:.2f} ms"
                            for name, value in state.timings.items())
        logger.info("step (%s): %d reqs, %d tokens, %d forward%s | %s",
                    "async" if async_step else "sync", self.input_batch.num_reqs,
                    state.scheduler_output.total_num_scheduled_tokens, state.forwards,
                    "" if state.forwards == 1 else "s", timings)

    def _sample_in_flight(self, state: StepState, discard: list[int]) -> MetalAsyncOutput:
        """Greedy tokens left on the device: the next step reads them there, the
        engine when it asks. The host books a placeholder for each."""
        batch = self.input_batch
        flight, rows = self.in_flight.launch(state.logits, discard)
        prompt_logprobs = self.prompt_logprobs.collect(state.prompt_logits, self.requests,
                                                       self.sampler)
        self.prompt_logprobs.finish(state.scheduler_output, self.requests)
        if self.debug:
            self._log_step(state, async_step=True)
        return MetalAsyncOutput(
            req_ids=list(batch.req_ids),
            req_id_to_index=dict(batch.req_id_to_index),
            rows=rows,
            flight=flight,
            settle=self.in_flight.settler(),
            prompt_logprobs=prompt_logprobs,
        )

    def _receive_samples(self, state: StepState) -> None:
        """A TP rank other than the stage's first books the tokens rank 0 sampled."""
        table = self.parallel.tp_broadcast_tokens(
            np.zeros((self.input_batch.num_reqs, 1 + self.num_spec_tokens), np.int32))
        self.batch.append_sampled(decode_sampled(table))
        self.prompt_logprobs.finish(state.scheduler_output, self.requests)
        return None

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        return self.drafts.take()

    def _batch_is_plain_greedy(self) -> bool:
        if self.model_config.logits_processors:
            return False  # custom logits processors run in vLLM's sampler
        return self.batch.all_plain_greedy()
