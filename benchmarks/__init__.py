"""Side-by-side benchmarks: vllm-metal against mlx-lm and vLLM's own CPU backend.

Run ``python -m benchmarks.run --scale small``; see benchmarks/README.md.
"""
