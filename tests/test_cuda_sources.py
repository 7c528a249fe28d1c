"""The project's CUDA kernels compile, on any machine: NVRTC, the compiler MLX's
CUDA build uses for ``mx.fast.cuda_kernel``, compiles every source our entry
points hand to MLX, for the H200's architecture (sm_90) and an A100's (sm_80).

The calls are recorded, not guessed: ``mx.fast.cuda_kernel`` is replaced by a
recorder, the real entry points run (attention in both layouts, with and without
a window and sinks; the in-place KV write for keys and values and for latent rows;
the few-row linear kernels, vector and tensor-core, at each row count and bias,
the vector one with its width split and unrolled), and each recorded call is
wrapped the way MLX wraps a custom kernel (its inputs' pointers, then shapes and
strides where the source names them, its outputs, its template constants) with
a small stand-in for MLX's device header. This catches what a GPU run would
catch first, a source that does not compile or a block whose threads need more
registers than an SM has (it would not launch), without the GPU; the kernels'
results are tested on MLX's CUDA build (``test_decode_kernel``, ``test_gemv``).
"""

import ctypes
import importlib.util
import re
from pathlib import Path

import mlx.core as mx
import pytest

from vllm_metal.attention import decode_kernel, fused_decode
from vllm_metal.models import decode_block, gemv

REGISTERS_A_BLOCK = 65536  # sm_80 and sm_90
CUDA_TYPES = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half",
              mx.int32: "int32_t"}
DEVICE_HEADER = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
typedef int int32_t;
struct Shape { int v[8]; __device__ int operator[](int i) const { return v[i]; } };
struct Strides {
  long long v[8];
  __device__ long long operator[](int i) const { return v[i]; }
};
"""


def cuda_toolkit() -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for version in ("cu13", "cu12"):
            base = Path(root) / version
            if list((base / "lib").glob("libnvrtc.so*")) and (base / "include/cuda_bf16.h").exists():
                return base
    return None


TOOLKIT = cuda_toolkit()
pytestmark = pytest.mark.skipif(TOOLKIT is None, reason="NVRTC and the CUDA headers "
                                "(requirements/test.txt) are not installed")


class Recorder:
    """Stands in for ``mx.fast.cuda_kernel``: keeps each call's kernel source,
    inputs and template, and returns zeros of the asked shapes."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, input_names, output_names, source, ensure_row_contiguous=True,
                 **_):
        def kernel(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **__):
            self.calls.append({"name": name, "source": source, "template": template,
                               "threads": threadgroup[0] * threadgroup[1] * threadgroup[2],
                               "inputs": list(zip(input_names, inputs)),
                               "outputs": list(zip(output_names, output_dtypes))})
            return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
        return kernel


def wrapped(call: dict) -> str:
    """The kernel as MLX's CUDA build compiles it: a ``__global__`` function of the
    inputs (with shape, strides and ndim where the source names them), the
    outputs, the template constants, then the body."""
    source = call["source"]
    params = []
    for name, array in call["inputs"]:
        params.append(f"const {CUDA_TYPES[array.dtype]}* {name}")
        if array.ndim > 0:
            for suffix, kind in (("shape", "Shape"), ("strides", "Strides"), ("ndim", "int")):
                if f"{name}_{suffix}" in source:
                    params.append(f"const __grid_constant__ {kind} {name}_{suffix}")
    params += [f"{CUDA_TYPES[dtype]}* {name}" for name, dtype in call["outputs"]]
    constants = []
    for name, value in call["template"]:
        if isinstance(value, bool):
            constants.append(f"constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            constants.append(f"constexpr int {name} = {value};")
        else:
            constants.append(f"using {name} = {CUDA_TYPES[value]};")
    return (DEVICE_HEADER + "namespace mlx { namespace core { namespace cu {\n"
            + f"__global__ void {call['name']}(\n    " + ",\n    ".join(params) + ") {\n"
            + "\n".join(constants) + "\n" + source + "\n}\n}}}\n")


def compile_log(source: str, arch: str) -> tuple[int, str]:
    nvrtc = ctypes.CDLL(str(sorted((TOOLKIT / "lib").glob("libnvrtc.so*"))[0]))
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernel.cu", 0,
                                    None, None) == 0
    options = [f"--gpu-architecture={arch}", "-std=c++17", "-default-device",
               f"-I{TOOLKIT / 'include'}", "--ptxas-options=-v"]
    argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = nvrtc.nvrtcCompileProgram(program, len(options), argv)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(max(size.value, 1))
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return status, log.value.decode(errors="replace")


def recorded_calls(monkeypatch) -> list[dict]:
    recorder = Recorder()
    monkeypatch.setattr(mx.fast, "cuda_kernel", recorder, raising=False)
    kernels = (decode_kernel._kernel, decode_kernel._write_kernel, gemv._kernel,
               fused_decode._kernel, decode_block._swiglu_kernel)
    for cached in kernels:
        cached.cache_clear()
    for dtype in (mx.bfloat16, mx.float16, mx.float32):
        for head_dim in (64, 128, 256):
            queries = mx.zeros((2, 4, 1, head_dim), dtype)
            pool = mx.zeros((64, head_dim), dtype)
            rows = mx.zeros((4, 2, 32), mx.int32)
            offsets = mx.zeros((2,), mx.int32)
            for key_per_lane in (False, True):
                for window, sinks in ((None, None), (8, mx.zeros((4,), dtype))):
                    decode_kernel.paged_decode_attention(queries, pool, rows, offsets, 0.1,
                                                         window, sinks, key_per_lane=key_per_lane)
        keys = mx.zeros((2, 2, 1, 128), dtype)
        pool = mx.zeros((64, 128), dtype)
        decode_kernel.write_in_place(pool, mx.zeros((4, 2, 1), mx.int32), keys, keys)
        decode_kernel.write_in_place(pool, mx.zeros((2, 2, 1), mx.int32), keys)
        weight = mx.zeros((24, 256), dtype)
        for rows in range(1, gemv.MAX_ROWS + 1):
            for bias in (None, mx.zeros((24,), dtype)):
                gemv.small_batch_linear(mx.zeros((rows, 1, 256), dtype), weight, bias)
            gemv.small_batch_linear(mx.zeros((rows, 1, 256), dtype), weight, None,
                                    (mx.zeros((256,), dtype), 1e-6), mx.zeros((rows, 1, 24), dtype))
        for rows, split, unroll in ((1, 4, 4), (2, 2, 8), (5, 4, 1)):
            gemv.small_batch_linear(mx.zeros((rows, 1, 256), dtype), weight, mx.zeros((24,), dtype),
                                    (mx.zeros((256,), dtype), 1e-6), mx.zeros((rows, 1, 24), dtype),
                                    split=split, unroll=unroll)
        if dtype in gemv.TENSOR_DTYPES:
            for rows, tiles in ((2, None), (9, (2, 2, 4)), (gemv.TENSOR_MAX_ROWS, None)):
                for bias in (None, mx.zeros((24,), dtype)):
                    gemv.small_batch_linear(mx.zeros((rows, 1, 256), dtype), weight, bias,
                                            kernel="tensor", tiles=tiles)
                gemv.small_batch_linear(mx.zeros((rows, 1, 256), dtype), weight, None,
                                        (mx.zeros((256,), dtype), 1e-6),
                                        mx.zeros((rows, 1, 24), dtype), kernel="tensor")
        for head_dim, heads, kv_heads in ((128, 16, 8), (64, 4, 4), (256, 8, 2)):
            qkv = mx.zeros((2, 1, (heads + 2 * kv_heads) * head_dim), dtype)
            norm = mx.zeros((head_dim,), dtype)
            for q_norm, traditional, write, warps in ((norm, False, True, 4), (None, True, False, 4),
                                                      (norm, False, True, 8),
                                                      (None, False, True, 32)):
                fused_decode.fused_decode_attention(
                    qkv, mx.zeros((64, head_dim), dtype), mx.zeros((2,), mx.int32),
                    mx.zeros((4, kv_heads, 1), mx.int32), mx.zeros((4, kv_heads, 32), mx.int32),
                    heads, kv_heads, 0.1, mx.zeros((head_dim // 2,), mx.float32), traditional,
                    q_norm, q_norm, 1e-6, write, warps=warps)
        decode_block.swiglu(mx.zeros((3, 1, 2 * 96), dtype))
    for cached in kernels:
        cached.cache_clear()  # the recorder must not outlive the test
    return recorder.calls


def distinct(calls: list[dict]) -> list[dict]:
    seen, unique = set(), []
    for call in calls:
        key = (call["name"], tuple((n, a.dtype, a.ndim) for n, a in call["inputs"]),
               tuple(call["template"]), call["threads"])
        if key not in seen:
            seen.add(key)
            unique.append(call)
    return unique


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_every_kernel_source_compiles(monkeypatch, arch):
    calls = distinct(recorded_calls(monkeypatch))
    names = {call["name"] for call in calls}
    assert names == {"vllm_metal_paged_decode_attention", "vllm_metal_paged_kv_write",
                     "vllm_metal_small_batch_linear", "vllm_metal_small_batch_linear_mma",
                     "vllm_metal_fused_decode_attention",
                     "vllm_metal_swiglu"}, names
    failures = []
    for call in calls:
        status, log = compile_log(wrapped(call), arch)
        if status != 0 or "warning" in log:
            failures.append(f"{call['name']} {call['template']}:\n{log[:2000]}")
            continue
        # A block whose threads need more than the SM's 64K registers does not launch.
        registers = int(re.search(r"Used (\d+) registers", log).group(1))
        if registers * call["threads"] > REGISTERS_A_BLOCK:
            failures.append(f"{call['name']} {call['template']}: {registers} registers a thread "
                            f"x {call['threads']} threads is past {REGISTERS_A_BLOCK}")
    assert not failures, "\n\n".join(failures[:3])


def test_a_broken_source_is_reported(monkeypatch):
    """The check can fail: a source with an undeclared name does not compile."""
    call = distinct(recorded_calls(monkeypatch))[0]
    status, log = compile_log(wrapped({**call, "source": call["source"] + "\nundeclared = 1;"}),
                              "sm_90")
    assert status != 0 and "undeclared" in log
