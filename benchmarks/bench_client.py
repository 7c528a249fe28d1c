"""vLLM's serving benchmark client, run several times in one process.

Each run is exactly ``vllm bench serve ARGS``: the same parser and the same
``vllm.benchmarks.serve.main`` the CLI calls; only the ~10 s import is shared.

    python -m benchmarks.bench_client RUNS.json RESULTS.json

RUNS: a list of argument lists. RESULTS: one result dict (or an error) per run.
"""

import json
import sys

KEPT_KEYS = (
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput", "max_concurrency",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms",
    "p99_itl_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "p50_ttft_ms", "p50_itl_ms",
    "p50_tpot_ms", "ttfts", "output_lens",
)


def parse(args: list[str]):
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    return parser.parse_args(args)


def run_one(args: list[str]) -> dict:
    from vllm.benchmarks.serve import main

    try:
        result = main(parse(args))
    except Exception as error:  # one failed run must not lose the others
        return {"error": f"{type(error).__name__}: {error}"}
    return {k: result[k] for k in KEPT_KEYS if k in result}


def main(argv: list[str]) -> None:
    runs_path, results_path = argv
    with open(runs_path) as f:
        runs = json.load(f)
    results = []
    for args in runs:
        results.append(run_one(args))
        with open(results_path, "w") as f:  # partial results survive a later hang
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1:])
