"""The runner's MLX work on a thread of its own (``mlx_thread``, the default of a
one-process engine): the same tokens as on the engine's thread, sampled and
greedy, with asynchronous scheduling on and off; errors reach the caller."""

import threading
import time

import mlx.core as mx
import pytest
from conftest import start_llm, stop_llm
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_metal.mlx_thread import MlxThread


def workload():
    prompts = [TokensPrompt(prompt_token_ids=[(17 * j + 3 * i) % 400 + 3 for j in range(5 + 23 * i)])
               for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=10 + 3 * i, ignore_eos=True) if i % 2
              else SamplingParams(temperature=0.8, seed=40 + i, max_tokens=12, ignore_eos=True)
              for i in range(6)]
    return prompts, params


def tokens(model: str, **options) -> list[list[int]]:
    llm = start_llm(model, max_num_batched_tokens=64, max_num_seqs=4, **options)
    try:
        prompts, params = workload()
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    finally:
        stop_llm(llm)


def logged(capfd) -> str:
    captured = capfd.readouterr()
    return captured.out + captured.err


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_thread_gives_the_engine_threads_tokens(tiny_model, monkeypatch, capfd, async_scheduling):
    model = tiny_model("qwen3")
    capfd.readouterr()
    threaded = tokens(model, async_scheduling=async_scheduling)
    assert "works on a thread of its own" in logged(capfd)
    monkeypatch.setenv("VLLM_METAL_RUNNER_THREAD", "0")
    inline = tokens(model, async_scheduling=async_scheduling)
    assert "works on a thread of its own" not in logged(capfd)
    assert threaded == inline


def test_mlx_work_submitted_to_the_thread_runs_there_in_order():
    thread = MlxThread()
    try:
        step = thread.call(lambda: mx.compile(lambda a: a * 2 + 1))
        results = [thread.submit(lambda i=i: step(mx.array([i])).item()) for i in range(5)]
        assert [r.result(timeout=30) for r in results] == [1, 3, 5, 7, 9]
        with pytest.raises(ValueError, match="from the thread"):
            thread.call(lambda: (_ for _ in ()).throw(ValueError("from the thread")))
    finally:
        thread.stop()


def test_call_unless_returns_when_queued_work_sets_the_event():
    thread = MlxThread()
    try:
        done = threading.Event()
        release = threading.Event()

        def earlier_work():  # a step's forward, which settles the step before it
            time.sleep(0.2)
            done.set()
            release.wait(30)

        thread.submit(earlier_work)
        start = time.monotonic()
        thread.call_unless(done, lambda: None)
        # earlier_work holds the thread for 30 s unless released: returning within
        # seconds means call_unless did not wait for the thread to drain.
        assert time.monotonic() - start < 5, "waited for the thread to drain"
        assert done.is_set()
        release.set()
        failed = threading.Event()
        with pytest.raises(RuntimeError, match="settle failed"):
            thread.call_unless(failed, lambda: (_ for _ in ()).throw(RuntimeError("settle failed")))
    finally:
        thread.stop()
