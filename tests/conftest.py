import json
import os
import socket

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
    try:
        llm.llm_engine.engine_core.shutdown()
    except RuntimeError as error:
        # An engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) ends with vLLM's
        # torch.accelerator.empty_cache(), which raises where torch has no accelerator
        # (this machine; not a Mac or an NVIDIA GPU).
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        if not (in_process and "accelerator" in str(error)):
            raise


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
