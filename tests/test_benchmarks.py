"""The benchmark suite end to end: ``python -m benchmarks.run`` in a subprocess."""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUMBER = re.compile(r"^-?\d+(\.\d+)?(x|%)?$")


def run_suite(scale: str, out: Path, timeout_s: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--scale", scale, "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s,
    )


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """Body rows of the first table after the heading that starts with ``heading``."""
    section = markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines[2:]]


def is_number(cell: str) -> bool:
    return bool(NUMBER.match(cell))


def assert_outputs(out: Path, scale: str) -> dict:
    markdown = (out / f"{scale}.md").read_text()
    text = (out / f"{scale}.json").read_text()
    assert str(REPO) not in text and str(out) not in text, "absolute paths in the results"
    results = json.loads(text)
    png = (out / f"{scale}-throughput.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000

    single = {(r[0], r[1]): r for r in table_rows(markdown, "Single-stream decode")}
    ours = single[("vllm-metal", "float32")]
    assert is_number(ours[2]) and float(ours[2]) > 0, ours  # decode tok/s
    assert is_number(ours[3]) and is_number(ours[4]), ours  # vs mlx-lm, % of limit
    assert is_number(single[("mlx-lm", "float32")][2])
    assert is_number(single[("bandwidth limit", "float32")][2])
    for engine in ("vllm-metal", "vllm-metal-4bit-kernels", "mlx-lm", "bandwidth limit"):
        assert is_number(single[(engine, "4bit")][2]), single[(engine, "4bit")]

    serving = table_rows(markdown, "Online serving")
    for server in ("vllm serve", "mlx_lm.server"):
        rows = [r for r in serving if r[0] == server]
        assert rows, f"no serving rows for {server}"
        for row in rows:
            assert all(is_number(cell) for cell in row[1:]), row

    ceiling = table_rows(markdown, "MLX forward ceiling")
    assert ceiling and all(is_number(cell) and float(cell) > 0 for row in ceiling for cell in row), ceiling
    assert all(is_number(r[1]) for r in table_rows(markdown, "Offline batch") if r[0] != "vllm-cpu")
    assert table_rows(markdown, "Targets"), "no targets table"

    assert results["bandwidth"]["bandwidth_gb_s"] > 0
    assert math.isfinite(results["ceilings"]["float32"]["ceiling_tok_s"])
    return results


@pytest.mark.slow  # a benchmark run (over 2 minutes): CI's time budget
def test_smoke_run_writes_table_json_and_plot(tmp_path):
    proc = run_suite("smoke", tmp_path, timeout_s=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = assert_outputs(tmp_path, "smoke")
    statuses = [r["status"] for r in results["offline"] + results["serving"]]
    assert all(s.startswith("ok") or s.startswith("not run") for s in statuses), statuses


@pytest.mark.slow
def test_small_run_meets_its_time_budget(tmp_path, request):
    if "slow" not in request.config.getoption("markexpr"):
        pytest.skip("about 15 minutes; run with -m slow")
    proc = run_suite("small", tmp_path, timeout_s=40 * 60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = assert_outputs(tmp_path, "small")
    assert results["elapsed_s"] < 20 * 60


def test_device_profile_runs_both_steps_and_writes_its_table(tiny_model, tmp_path):
    """On a machine without CUDA the profile records no kernels, says so, and
    still times both kinds of step and a variant; on the GPU machine it lists the
    kernels."""
    model = tiny_model("qwen3", num_hidden_layers=2)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.device_profile", model, "--batch", "1",
                           "--steps", "3", "--out", str(tmp_path),
                           "--variants", "warps-8:VLLM_METAL_ATTENTION_WARPS=8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads((tmp_path / "device_profile.json").read_text())
    names = ["mlx_lm", "plugin_compiled", "plugin_compiled:warps-8"]
    for name in names:
        assert result[name]["wall_ms"] > 0
        assert "kernel_ms" in result[name] or "no device activity" in result[name]["note"]
    rows = [line for line in (tmp_path / "device_profile.md").read_text().splitlines()
            if line.startswith("| 1 |")]
    assert [row.split("|")[2].strip() for row in rows] == names


def test_step_loop_brackets_the_plugins_steps_between_mlx_lms(tiny_model, tmp_path):
    model = tiny_model("llama", num_hidden_layers=2)
    done = subprocess.run([sys.executable, "-m", "benchmarks.step_loop", model, "--batch", "1", "2",
                           "--steps", "5", "--variants", "warps-8:VLLM_METAL_ATTENTION_WARPS=8",
                           "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "step_loop.json").read_text())
    assert [r["batch"] for r in results] == [1, 2]
    for r in results:
        assert r["variants"] == {"warps-8": {"VLLM_METAL_ATTENTION_WARPS": "8"}}
        assert len(r["mlx_lm"]["runs_ms"]) == 3
        for name in ("plugin_compiled", "plugin_compiled:warps-8"):
            assert len(r[name]["runs_ms"]) == 2
            assert 0 < r[name]["issue_ms"] and 0 < r[name]["step_ms"]
        assert r["ratio"] == round(r["mlx_lm"]["step_ms"] / r["plugin_compiled"]["step_ms"], 3)
    rows = [line.split("|")[2].strip()
            for line in (tmp_path / "step_loop.md").read_text().splitlines()[2:]]
    assert rows == ["mlx_lm", "plugin_compiled", "plugin_compiled:warps-8"] * 2


STEP_LOG_SCRIPT = """
import sys
from vllm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", max_model_len=256, kv_cache_memory_bytes=1 << 24,
          async_scheduling=sys.argv[2] == "async")
llm.generate([{"prompt_token_ids": [5, 6, 7]}],
             SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
"""


@pytest.mark.parametrize("scheduling", ["async", "sync"])
def test_overhead_reads_the_runners_step_lines(tiny_model, scheduling):
    """The suite's per-step overhead parses what the runner logs under
    VLLM_METAL_DEBUG=1, in both the asynchronous and the synchronous step's form."""
    from benchmarks import overhead

    env = dict(os.environ, VLLM_METAL_DEBUG="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-c", STEP_LOG_SCRIPT, tiny_model("qwen3"), scheduling],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = overhead.decode_steps(done.stdout + done.stderr)
    assert len(steps) >= 5, done.stderr[-2000:]
    assert all(step["issue"] > 0 for step in steps)
    assert any(step["sample"] > 0 for step in steps) == (scheduling == "sync")
    # "forward issue" holds the graph's building, so the readers count "build" once.
    lines = list(overhead.STEP_LINE.finditer(done.stdout + done.stderr))
    assert lines
    for parts in map(overhead.step_parts, lines):
        assert parts["forward issue"] >= parts["build"] > 0


def test_attention_kernels_writes_its_table(tmp_path):
    """MLX's own attention on every machine; the project's kernels beside it on
    MLX's CUDA build, each with its device time per launch there."""
    from vllm_metal.device import on_cuda

    done = subprocess.run([sys.executable, "-m", "benchmarks.attention_kernels", "--heads", "4", "2",
                           "64", "--batch", "1", "--context", "40", "--layers", "2", "--steps", "2",
                           "--out", str(tmp_path)],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "attention_kernels.json").read_text())
    names = {row["kernel"] for row in rows}
    assert "mlx sdpa, dense" in names
    assert len(names) == (5 if on_cuda() else 1)
    assert all(row["batch"] == 1 and row["context"] == 40 for row in rows)
    assert (tmp_path / "attention_kernels.md").read_text().count("| mlx sdpa, dense | 1 | 40 |") == 1


def test_linear_kernels_writes_its_table(tmp_path):
    """MLX's matmul on every machine; the project's kernels beside it, each with the
    choices given, on MLX's CUDA build."""
    from vllm_metal.device import on_cuda

    done = subprocess.run([sys.executable, "-m", "benchmarks.linear_kernels", "--shapes",
                           "qwen3-0.6b", "--rows", "2", "--per-warp", "1", "2", "--tiles", "1-2-4",
                           "--steps", "2",
                           "--bytes", "1000000", "--out", str(tmp_path)],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "linear_kernels.json").read_text())
    assert {row["product"] for row in rows} == {"qkv", "o", "gate_up", "down"}
    methods = {row["method"] for row in rows}
    assert methods == ({"matmul", "vector", "vector, 1 rows a warp", "tensor", "tensor, tiles 1-2-4"}
                       if on_cuda() else {"matmul"})
    if on_cuda():
        assert all(row["us"] > 0 for row in rows)
    assert (tmp_path / "linear_kernels.md").read_text().count("| qwen3-0.6b | down | 2 |") == 1


def test_linear_kernels_matmul_only_weighs_apart_products(tmp_path):
    """--matmul-only: MLX's matmul both ways round, on mlx-lm's unfused shapes too."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.linear_kernels", "--shapes",
                           "qwen3-0.6b", "qwen3-0.6b-apart", "--rows", "8", "--matmul-only",
                           "--steps", "2", "--bytes", "1000000", "--out", str(tmp_path)],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "linear_kernels.json").read_text())
    assert {row["method"] for row in rows} == {"matmul", "matmul, weight first"}
    assert {(row["shape"], row["product"]) for row in rows} >= {
        ("qwen3-0.6b", "gate_up"), ("qwen3-0.6b-apart", "gate/up"), ("qwen3-0.6b-apart", "k/v")}


@pytest.mark.slow  # three servers on the tiny shape (about 3 minutes): CI's time budget
def test_gpu_benchmarks_online_part_brackets_the_plugin_between_mlx_lm_runs(tmp_path):
    """``benchmarks.gpu --parts online`` on any machine: mlx_lm.server, vllm serve,
    mlx_lm.server again at each concurrency, and the plugin's ratio to their mean."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--shapes", "tiny", "--parts",
                           "online", "--models", str(tmp_path / "models"), "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["online"]
    assert [r["concurrency"] for r in rows] == [1, 8, 32]
    for r in rows:
        assert not r["status"], r
        assert r["plugin"] > 0 and r["mlx_lm_a"] > 0 and r["mlx_lm_b"] > 0
        assert r["ratio"] == pytest.approx(r["plugin"] / ((r["mlx_lm_a"] + r["mlx_lm_b"]) / 2),
                                           rel=1e-2)
    table = table_rows((tmp_path / "gpu.md").read_text(), "Online")
    assert len(table) == 3 and all(is_number(row[4]) for row in table), table


def test_step_loop_variants_take_values_with_commas():
    from benchmarks.device_profile import parse_variant

    assert parse_variant("both:MLX_LIST=a,b,VLLM_METAL_ATTENTION_WARPS=8") == (
        "both", {"MLX_LIST": "a,b", "VLLM_METAL_ATTENTION_WARPS": "8"})
    with pytest.raises(argparse.ArgumentTypeError):
        parse_variant("no-settings")


def test_issue_cost_large_products_are_the_8b_weights_products():
    """``issue_cost --large`` times what it names: independent [rows, 4096] x [4096, 28672]
    products of one weight (as many arrays as asked for, equal, not zero); only with --large."""
    import mlx.core as mx

    from benchmarks.issue_cost import kinds

    table = kinds(mx, batch=2, large=True)
    name = "matmul [2,4096]x[4096,28672], independent"
    assert name in table and name not in kinds(mx, batch=2)
    products = table[name](3)
    mx.eval(products)
    assert len(products) == 3 and all(p.shape == (2, 28672) for p in products)
    assert len({id(p) for p in products}) == 3  # three primitives, not one reused
    assert mx.array_equal(products[1], products[0]).item()
    assert mx.abs(products[0].astype(mx.float32)).max().item() > 0


def test_gpu_benchmarks_offline_part_names_the_first_runs_slowest_step(tmp_path):
    """``benchmarks.gpu --parts offline`` on any machine: mlx-lm's loop and the plugin at
    each batch, and the step of the plugin's first run that took longest (where a
    one-time cost would show), read from the engine's own step lines."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--shapes", "tiny", "--parts",
                           "offline", "--batches", "1", "4", "--variants", "default",
                           "--models", str(tmp_path / "models"), "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["offline"]
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["plugin"] > 0 and r["mlx_lm_a"] > 0 and r["plugin_first"] > 0
        step = r["plugin_first_slowest_step"]
        # The run's steps: its prompts' prefill (32 tokens each) and decodes of `batch` rows.
        assert 1 <= step["reqs"] <= r["batch"] and 1 <= step["tokens"] <= 32 * r["batch"], step
        # Its total counts "build" once: "forward issue" holds it.
        assert step["ms"] == pytest.approx(sum(step["parts"].values()) - step["parts"]["build"],
                                           abs=0.01)
        assert step["ms"] > 0
    table = table_rows((tmp_path / "gpu.md").read_text(), "The slowest step")
    assert [row[1] for row in table] == ["1", "4"], table


def test_gpu_benchmarks_online_runs_warm_each_concurrency_with_distinct_prompts():
    """Each measured concurrency follows an unmeasured run of as many prompts as clients,
    whose seed (as vllm bench parses the command) differs from the measured run's, so
    its prompts share no prefix with the measured ones."""
    from vllm.benchmarks.serve import add_cli_args

    from benchmarks.gpu import online_runs
    from benchmarks.scales import SCALES
    from benchmarks.serving import common_args

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    scale = SCALES["smoke"]
    runs = online_runs(scale)
    assert [(kind, fields["concurrency"]) for kind, fields, _ in runs] == [
        (kind, c) for c in scale.serve_concurrencies for kind in ("warm-up", "serving")]
    base = common_args("http://127.0.0.1:1", REPO, "vllm serve")
    parsed = [parser.parse_args(base + args) for _, _, args in runs]
    for (kind, fields, _), args in zip(runs, parsed):
        assert args.max_concurrency == fields["concurrency"]
        if kind == "warm-up":
            assert args.num_prompts == fields["concurrency"] and args.num_warmups == 0
    seeds = [args.seed for args in parsed]
    assert len(set(seeds[0::2])) == len(seeds[0::2]) and set(seeds[0::2]).isdisjoint(seeds[1::2])


def test_engine_timeline_splits_the_call_into_busy_and_idle_device_time():
    """Overlapping kernels count once; the idle time before, between and after them
    adds up to the call's wall time less the busy time."""
    from benchmarks.engine_timeline import timeline

    def kernel(ts, dur):
        return {"cat": "kernel", "ts": ts, "dur": dur}

    events = [kernel(100, 300), kernel(200, 400),  # overlap: busy 100-600
              kernel(900, 100),                    # gap of 300 before it
              kernel(1000, 1000),                  # back to back: busy 900-2000
              {"cat": "cpu_op", "ts": 0, "dur": 5000},  # not the device's
              kernel(9000, 10)]                    # after the call: not counted
    t = timeline(events, begin=0, end=2500)
    assert t["busy_ms"] == 1.6 and t["kernels"] == 4
    assert (t["idle_before_ms"], t["idle_inside_ms"], t["idle_after_ms"]) == (0.1, 0.3, 0.5)
    assert t["busy_ms"] + 0.1 + 0.3 + 0.5 == pytest.approx(t["wall_ms"])
    assert t["longest_gaps"] == [{"at_ms": 0.6, "ms": 0.3}]
    # The span 100-2000 in tenths of 190: the gap 600-900 leaves the 3rd to 5th tenths part idle.
    assert t["busy_share_by_tenth"][0] == 1.0 and t["busy_share_by_tenth"][-1] == 1.0
    assert t["busy_share_by_tenth"][3] < 1.0
    assert sum(t["busy_share_by_tenth"]) * 190 == pytest.approx(1600, abs=1)


def test_gpu_benchmarks_timeline_part_sets_the_engines_step_beside_the_devices(tmp_path):
    """``--parts offline timeline``: at batch 1, the engine's ms a step from its unprofiled
    runs and from the offline part, beside the device's busy time a step (none recorded
    without CUDA, and then no share above it)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--shapes", "tiny", "--parts",
                           "offline", "timeline", "--batches", "1", "--variants", "default",
                           "--models", str(tmp_path / "models"), "--out", str(tmp_path)],
                          cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    (row,) = result["timeline"]
    (offline,) = result["offline"]
    assert row["shape"] == "tiny" and row["batch"] == 1
    assert row["offline_ms"] == pytest.approx(1e3 / offline["plugin"], rel=1e-3)
    assert 0 < row["engine_ms"] < 1e3
    if row["device_ms"] is None:
        assert "no device activity" in row["timeline"]["note"]
        assert "engine_above_device" not in row
    else:
        assert row["engine_above_device"] == pytest.approx(row["engine_ms"] / row["device_ms"] - 1,
                                                           abs=1e-3)
    (line,) = table_rows((tmp_path / "gpu.md").read_text(), "The step against the device")
    assert line[0] == "tiny" and float(line[2]) == pytest.approx(row["engine_ms"], abs=0.01)


def test_commit_ab_runs_an_earlier_commits_plugin_beside_this_one(tiny_model, tmp_path):
    """Each engine is a worker process of this checkout's harness; REF's engine imports
    REF's own plugin (its tree checked out aside), a variant this checkout's with its
    settings; rounds alternate and every engine has one figure per round."""
    model = tiny_model("qwen3", num_hidden_layers=2)
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.commit_ab", "HEAD~1", "--rounds",
                               "2", "--tokens", "8", "--model", model, "--trees",
                               str(tmp_path / "trees"), "--variant",
                               "inline:VLLM_METAL_RUNNER_THREAD=0", "--out", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=900)
        check_commit_ab(done, tmp_path)
    finally:
        for tree in (tmp_path / "trees").glob("*"):
            if not tree.name.endswith("-plugin"):
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO,
                               capture_output=True)


def check_commit_ab(done: subprocess.CompletedProcess, tmp_path: Path) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "commit_ab.json").read_text())
    assert [r["engine"] for r in rows] == ["HEAD~1", "this checkout", "inline"]
    assert all(len(r["decode_tok_s"]) == 2 and r["itl_p50_ms"] > 0 for r in rows)
    assert rows[0]["vs_HEAD~1"] == 1.0
    plugin = next((tmp_path / "trees").glob("*-plugin")) / "vllm_metal"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD~1"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    assert plugin.resolve() == (tmp_path / "trees" / commit / "vllm_metal").resolve()
    probe = subprocess.run([sys.executable, "-c", "import vllm_metal; print(vllm_metal.__file__)"],
                           cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(plugin.parent)),
                           capture_output=True, text=True)
    assert str(tmp_path / "trees") in probe.stdout


def test_engine_timeline_refuses_a_step_count_it_would_not_use():
    """A generate sets its own steps: ``--steps`` is refused, not silently ignored."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.engine_timeline", "MODEL", "--steps", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unrecognized arguments: --steps 3" in done.stderr
