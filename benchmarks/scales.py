"""How big each run is. ``full`` is the issue's workload (hours on a 2-core CPU:
meant for a Mac or a GPU); ``small`` is the default and fits in 20 minutes on the
2-core Linux CPU; ``smoke`` is the CI check (about a minute, tiny model)."""

from dataclasses import dataclass

MiB = 1 << 20

# A single-stream variant beside the dtypes: the same model quantized to MLX
# 4-bit by mlx_lm.convert (group 64, float32 scales), loaded at float32.
QUANTIZED = "4bit"


@dataclass(frozen=True)
class Scale:
    name: str
    # single-stream decode (the Qwen3-0.6B-shaped model)
    single_model: str
    single_dtypes: tuple[str, ...]
    single_prompt_len: int
    single_new_tokens: int
    # offline batch, online serving and prefix caching (a smaller model on CPU)
    concurrency_model: str
    concurrency_dtype: str
    batch_requests: int
    batch_prompt_range: tuple[int, int]
    batch_new_tokens: int
    serve_concurrencies: tuple[int, ...]
    serve_prompt_len: int
    serve_output_len: int
    serve_prompts_per_client: int  # requests = max(concurrency * this, 4)
    prefix_len: int
    prefix_suffix_len: int
    prefix_requests: int
    prefix_output_len: int
    # which optional runs happen
    run_cpu_backend: bool
    run_prefix_cold: bool
    # vLLM's CPU backend: skip its torch.compile warm-up (~50 s per start here,
    # its compile cache does not reload) -- eager decodes as fast on this CPU
    cpu_backend_eager: bool
    kv_cache_bytes: int
    max_model_len: int
    bandwidth_buffer_bytes: int
    timeout_s: int  # per worker / per server session


SCALES = {
    "smoke": Scale(
        name="smoke",
        single_model="tiny-qwen3", single_dtypes=("float32", QUANTIZED),
        single_prompt_len=32, single_new_tokens=16,
        concurrency_model="tiny-qwen3", concurrency_dtype="float32",
        batch_requests=4, batch_prompt_range=(8, 32), batch_new_tokens=8,
        serve_concurrencies=(1, 4), serve_prompt_len=32, serve_output_len=8,
        serve_prompts_per_client=1,
        prefix_len=256, prefix_suffix_len=16, prefix_requests=4, prefix_output_len=2,
        run_cpu_backend=False, run_prefix_cold=False, cpu_backend_eager=True,
        kv_cache_bytes=64 * MiB, max_model_len=512, bandwidth_buffer_bytes=256 * MiB, timeout_s=300,
    ),
    "small": Scale(
        name="small",
        single_model="qwen3-0.6b", single_dtypes=("bfloat16", "float32", QUANTIZED),
        single_prompt_len=128, single_new_tokens=32,
        concurrency_model="smollm2-135m", concurrency_dtype="float32",
        batch_requests=16, batch_prompt_range=(32, 256), batch_new_tokens=32,
        serve_concurrencies=(1, 4, 16), serve_prompt_len=128, serve_output_len=32,
        serve_prompts_per_client=2,
        prefix_len=1024, prefix_suffix_len=32, prefix_requests=8, prefix_output_len=4,
        run_cpu_backend=True, run_prefix_cold=True, cpu_backend_eager=True,
        kv_cache_bytes=512 * MiB, max_model_len=2048, bandwidth_buffer_bytes=1024 * MiB, timeout_s=600,
    ),
    "full": Scale(
        name="full",
        single_model="qwen3-0.6b", single_dtypes=("bfloat16", "float32", QUANTIZED),
        single_prompt_len=128, single_new_tokens=256,
        concurrency_model="qwen3-0.6b", concurrency_dtype="bfloat16",
        batch_requests=64, batch_prompt_range=(64, 1024), batch_new_tokens=256,
        serve_concurrencies=(1, 4, 16), serve_prompt_len=512, serve_output_len=256,
        serve_prompts_per_client=4,
        prefix_len=1024, prefix_suffix_len=64, prefix_requests=32, prefix_output_len=16,
        run_cpu_backend=True, run_prefix_cold=True, cpu_backend_eager=False,
        kv_cache_bytes=4096 * MiB, max_model_len=4096, bandwidth_buffer_bytes=2048 * MiB,
        timeout_s=7200,
    ),
}


def single_run(scale: Scale, variant: str) -> tuple[str, str]:
    """(model name, dtype the engines load it at) of a single-stream variant."""
    if variant == QUANTIZED:
        return f"{scale.single_model}-{QUANTIZED}", "float32"
    return scale.single_model, variant
