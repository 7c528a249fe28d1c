"""MLX's NCCL backend: what this machine can check without NVIDIA GPUs. Selecting
it where MLX has no CUDA device, or with pipeline parallel, stops startup with the
fix; each rank's NCCL settings come from the ranks' exchange; each rank keeps to
its own GPU. (TP=2 against TP=1 on two GPUs needs a two-GPU machine.)"""

import pytest

from conftest import start_llm
from vllm_metal.distributed.nccl import cuda_available, nccl_environment, pin_gpu
from vllm_metal.distributed.parallel import Topology


def test_nccl_is_refused_where_mlx_has_no_cuda_gpu(tiny_model, monkeypatch):
    if cuda_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.setenv("VLLM_METAL_DISTRIBUTED_BACKEND", "nccl")
    with pytest.raises(Exception) as error:
        start_llm(tiny_model("llama"), tensor_parallel_size=2)
    message = str(error.value)
    assert "VLLM_METAL_DISTRIBUTED_BACKEND=nccl on a machine where MLX has no CUDA GPU" in message
    assert "use the ring backend" in message


def test_nccl_with_pipeline_parallel_is_refused(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_METAL_DISTRIBUTED_BACKEND", "nccl")
    with pytest.raises(Exception) as error:
        start_llm(tiny_model("llama"), pipeline_parallel_size=2)
    assert "--pipeline-parallel-size 2 on nccl" in str(error.value)


def test_each_rank_gets_rank_zeros_rendezvous():
    everyone = [{"rank": r, "host": f"10.0.0.{r + 1}", "ring_port": 5000 + r} for r in range(4)]
    settings = [nccl_environment(everyone, Topology(rank, 4, 1)) for rank in range(4)]
    assert [s["MLX_RANK"] for s in settings] == ["0", "1", "2", "3"]
    assert {(s["NCCL_HOST_IP"], s["NCCL_PORT"], s["MLX_WORLD_SIZE"]) for s in settings} == {
        ("10.0.0.1", "5000", "4")}


def test_each_rank_keeps_to_its_own_gpu(monkeypatch):
    monkeypatch.delenv("VLLM_METAL_VISIBLE_DEVICES", raising=False)
    pin_gpu(1)
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("VLLM_METAL_VISIBLE_DEVICES", "4,6")
    pin_gpu(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
