import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Prompts of four lengths (1 to about 240 tokens) that parity tests give both the
# engine and transformers.
PARITY_PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time there was a small village by the sea, and every morning the "
    "fishermen went out before dawn to bring back their catch for the market.",
    " ".join(f"word{i}" for i in range(120)),
]

# Small, fixed KV caches keep engines quick to start and let several run at once.
KV_BYTES = 64 * 1024**2


def requires_tool(missing: str | None):
    """Mark tests that need a tool of the machine (``missing``: why it is not
    usable here, None when it is). Outside CI they skip without it; in CI (``CI``
    set) they fail, so a lost tool cannot silently shrink the suite."""
    return pytest.mark.requires_tool(missing)


# The suite runs on two pytest-xdist workers (pyproject's addopts) with ``--dist
# loadfile``: each module's tests run on one worker, so a module-scoped engine or server
# starts once. (``loadgroup``'s groups take no effect with pytest 9: xdist 3.8 marks a
# grouped test by renaming ``item._nodeid``, which pytest 9 no longer reads.) What must
# not run beside other modules is kept apart by ``machine_share``'s locks.

# Modules that run with no other test at once (``machine_share``), and why.
EXCLUSIVE = {
    "test_memory_defaults.py": "reads the machine's free memory and decode speed, holds most of it",
    "test_readme.py": "runs ./install.sh, which reinstalls the plugin other engines load",
    "test_serving_limits.py": "a refusal within one second",
}
# Modules that run one at a time among themselves: they count the plugin's Ray worker
# actors machine-wide, so another module's Ray engine must not run beside them.
RAY_COUNTING = {"test_ray.py", "test_stalled_rank.py"}


@pytest.fixture(scope="module", autouse=True)
def machine_share(request, tmp_path_factory):
    """Between xdist workers: a module in ``EXCLUSIVE`` holds the machine alone while
    it runs; every other module holds it shared. A waiting exclusive module first
    closes a gate that new modules must pass, so it waits only for the modules
    already running."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    exclusive = Path(request.module.__file__).name in EXCLUSIVE
    root = tmp_path_factory.getbasetemp().parent  # this run's, shared by its workers
    with contextlib.ExitStack() as held:
        gate = held.enter_context(open(root / "machine.gate", "a"))
        share = held.enter_context(open(root / "machine.share", "a"))
        fcntl.flock(gate, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(share, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        if Path(request.module.__file__).name in RAY_COUNTING:
            ray = held.enter_context(open(root / "machine.ray", "a"))
            fcntl.flock(ray, fcntl.LOCK_EX)
        yield


def pytest_runtest_setup(item):
    for marker in item.iter_markers("requires_tool"):
        missing = marker.args[0]
        if missing is None:
            continue
        if os.environ.get("CI"):
            pytest.fail(f"CI lacks a tool these tests need: {missing}", pytrace=False)
        pytest.skip(missing)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch, **overrides)`` -> path of a cached tiny random checkpoint."""
    from vllm_metal.testing.tiny_models import write_tiny_model

    made = {}

    def make(arch: str, **overrides) -> str:
        key = (arch, json.dumps(overrides, sort_keys=True))
        if key not in made:
            made[key] = str(write_tiny_model(arch, tmp_path_factory.mktemp(arch), **overrides))
        return made[key]

    return make


@pytest.fixture(autouse=True)
def restore_environment():
    """vLLM's config sets process-wide variables (an external_launcher backend sets
    VLLM_ENABLE_V1_MULTIPROCESSING=0): no test may leave them to the next."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def start_llm(model: str, **kwargs):
    from vllm import LLM

    options = dict(kv_cache_memory_bytes=KV_BYTES, max_model_len=1024, dtype="float32", seed=0)
    options.update(kwargs)
    return LLM(model, **options)


def stop_llm(llm) -> None:
    # In this process too (VLLM_ENABLE_V1_MULTIPROCESSING=0) the teardown must not raise:
    # vLLM's empty_cache calls are made harmless by the platform where torch has no accelerator.
    llm.llm_engine.engine_core.shutdown()


def engine_greedy_tokens(model: str, prompts, max_tokens: list[int], **options) -> list[list[int]]:
    """Each prompt's greedy tokens (``ignore_eos``) from this plugin's engine, started for
    the call (the transformers reference is ``vllm_metal.testing.reference.greedy_tokens``)."""
    from vllm import SamplingParams

    llm = start_llm(model, **options)
    try:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                  for n in max_tokens]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    finally:
        stop_llm(llm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
