"""The KV cache budget's arithmetic, with the figures of real machines passed in."""

import pytest

from vllm_metal import memory
from vllm_metal.memory import (
    ACTIVATION_RESERVE_BYTES,
    GiB,
    Demand,
    KVCacheMemoryError,
    MemoryView,
    check_explicit_size,
    kv_cache_budget,
    memory_fraction,
)

# SmolLM2-135M at float32: 30 layers, 3 KV heads of 64, 16-token blocks.
SMOLLM2 = Demand(weights=540_000_000, block_bytes=2 * 30 * 16 * 3 * 64 * 4,
                 blocks_per_request=512, max_num_seqs=256)
VM_24G = MemoryView("cpu", 24 * GiB, None, 24 * GiB, 21 * GiB)
MAC_16G = MemoryView("metal", 11_453_251_584, None, 16 * GiB, 14 * GiB)  # an M2's working set
H100 = MemoryView("cuda", 80 * GiB, 79 * GiB, 512 * GiB, 400 * GiB)


def test_cpu_default_is_the_cap_when_memory_is_plentiful():
    budget = kv_cache_budget(VM_24G, SMOLLM2, 0.92)
    assert budget.nbytes == memory.CPU_KV_CACHE_CAP_BYTES
    assert "cap" in budget.limited_by


def test_cpu_budget_shrinks_to_what_is_available_less_the_reserve():
    held = MemoryView("cpu", 24 * GiB, None, 24 * GiB, 12 * GiB)
    budget = kv_cache_budget(held, SMOLLM2, 0.92)
    expected = 12 * GiB - int(24 * GiB * memory.HOST_RESERVE_SHARE) - ACTIVATION_RESERVE_BYTES
    assert budget.nbytes == expected < memory.CPU_KV_CACHE_CAP_BYTES
    assert "available now" in budget.limited_by


def test_cpu_budget_is_no_more_than_the_requests_can_fill():
    short = Demand(weights=0, block_bytes=1 << 20, blocks_per_request=4, max_num_seqs=8)
    assert kv_cache_budget(VM_24G, short, 0.92).nbytes == (8 * 4 + 1) << 20


def test_metal_uses_the_working_set_share_less_weights():
    budget = kv_cache_budget(MAC_16G, SMOLLM2, 0.5)
    assert budget.nbytes == int(11_453_251_584 * 0.5) - SMOLLM2.weights - ACTIVATION_RESERVE_BYTES


def test_metal_is_bounded_by_available_memory_too():
    busy = MemoryView("metal", 11_453_251_584, None, 16 * GiB, 7 * GiB)
    budget = kv_cache_budget(busy, SMOLLM2, 0.92)
    assert budget.nbytes == 7 * GiB - int(16 * GiB * 0.35) - ACTIVATION_RESERVE_BYTES


def test_cuda_uses_device_memory_not_the_hosts():
    budget = kv_cache_budget(H100, SMOLLM2, 0.92)
    assert budget.nbytes == int(80 * GiB * 0.92) - SMOLLM2.weights - ACTIVATION_RESERVE_BYTES
    shared = MemoryView("cuda", 80 * GiB, 20 * GiB, 512 * GiB, 400 * GiB)
    assert kv_cache_budget(shared, SMOLLM2, 0.92).nbytes == 20 * GiB - ACTIVATION_RESERVE_BYTES


def test_ranks_on_one_host_split_the_budget():
    two = Demand(**{**SMOLLM2.__dict__, "ranks_on_host": 2})
    held = MemoryView("cpu", 24 * GiB, None, 24 * GiB, 12 * GiB)
    one_rank = kv_cache_budget(held, SMOLLM2, 0.92).nbytes
    assert kv_cache_budget(held, two, 0.92).nbytes == (
        (12 * GiB - int(24 * GiB * 0.35)) // 2 - ACTIVATION_RESERVE_BYTES)
    assert kv_cache_budget(held, two, 0.92).nbytes < one_rank


def test_too_little_for_one_request_names_the_settings():
    full = MemoryView("cpu", 24 * GiB, None, 24 * GiB, int(2.4 * GiB))
    with pytest.raises(KVCacheMemoryError) as error:
        kv_cache_budget(full, SMOLLM2, 0.92)
    for name in ("--max-model-len", "--kv-cache-memory-bytes", "--gpu-memory-utilization",
                 "VLLM_METAL_MEMORY_FRACTION"):
        assert name in str(error.value)


def test_explicit_size_past_available_memory_is_refused():
    with pytest.raises(KVCacheMemoryError, match="--kv-cache-memory-bytes"):
        check_explicit_size(VM_24G, SMOLLM2, 22 * GiB)
    check_explicit_size(VM_24G, SMOLLM2, 8 * GiB)


def test_fraction_follows_gpu_memory_utilization_unless_the_variable_is_set(monkeypatch):
    monkeypatch.delenv("VLLM_METAL_MEMORY_FRACTION", raising=False)
    assert memory_fraction(0.5, 0.92) == 0.5
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "0.7")
    assert memory_fraction(0.92, 0.92) == 0.7
    assert memory_fraction(0.7, 0.92) == 0.7
    with pytest.raises(KVCacheMemoryError, match="VLLM_METAL_MEMORY_FRACTION"):
        memory_fraction(0.5, 0.92)
