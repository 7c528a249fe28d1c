"""Every distributed startup error a user can cause ends quickly, in a message that
names the fix."""

import json
import subprocess
import sys
import time

import pytest

from conftest import free_port, requires_tool, start_llm
from vllm_metal.distributed.bootstrap import _check_settings, _check_versions, software_versions
from vllm_metal.distributed.hostfile import read_hostfile
from vllm_metal.distributed.parallel import DistributedError
from vllm_metal.distributed.preflight import host_report
from vllm_metal.launch import check_reports
from vllm_metal.testing.netns import SimulatedHosts, can_simulate_hosts


def refused(model, **options) -> str:
    start = time.monotonic()
    with pytest.raises(Exception) as error:
        start_llm(model, **options)
    assert time.monotonic() - start < 60
    return str(error.value)


def test_heads_not_divisible_by_tensor_parallel_size(tiny_model):
    # vLLM's own check covers attention heads; KV heads it would replicate.
    message = refused(tiny_model("llama"), tensor_parallel_size=3)
    assert "attention heads (4) must be divisible by tensor parallel size (3)" in message
    message = refused(tiny_model("llama"), tensor_parallel_size=4)
    assert "4 attention heads and 2 KV heads" in message and "divides 2" in message


def test_layout_the_ring_cannot_link(tiny_model):
    message = refused(tiny_model("llama", num_key_value_heads=4), tensor_parallel_size=4,
                      pipeline_parallel_size=2)
    assert "ring backend" in message and "TP=2 x PP=2" in message


def test_ngram_with_pipeline_parallel(tiny_model):
    message = refused(tiny_model("llama"), pipeline_parallel_size=2, speculative_config={
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})
    assert "--speculative-config with --pipeline-parallel-size" in message


def launch(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_metal.launch", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_unreadable_hostfile(tmp_path):
    done = launch("--hostfile", str(tmp_path / "missing.json"), "--", "model")
    assert done.returncode == 2
    assert "cannot read hostfile" in done.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "is not valid JSON" in launch("--hostfile", str(bad), "--", "model").stderr


def test_hostfile_without_addresses(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"hosts": [{"ssh": "mac1"}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]}))
    done = launch("--hostfile", str(path), "--", "model")
    assert done.returncode == 2 and 'host 0 (mac1) needs "ips"' in done.stderr


def test_hostfile_inconsistent_with_tensor_parallel_size(tmp_path):
    path = tmp_path / "hosts.json"
    hosts = [{"ssh": f"h{i}", "ips": [f"10.0.0.{i + 1}"]} for i in range(3)]
    path.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    done = launch("--hostfile", str(path), "--", "model", "--tensor-parallel-size", "2")
    assert done.returncode == 2
    assert "do not spread evenly over the hostfile's 3 hosts" in done.stderr


def test_print_gives_each_hosts_command(tmp_path):
    path = tmp_path / "hosts.json"
    hosts = [{"ssh": f"mac{i}", "ips": [f"10.0.0.{i + 1}"]} for i in range(2)]
    path.write_text(json.dumps({"hosts": hosts, "envs": ["OMP_NUM_THREADS=4"]}))
    done = launch("--hostfile", str(path), "--print", "--", "/models/m", "--port", "8000")
    assert done.returncode == 0
    first, second = done.stdout.split("# host 1 (mac1)")
    assert "VLLM_HOST_IP=10.0.0.1" in first and "--node-rank 0" in first
    assert "--headless" not in first and "--tensor-parallel-size 2" in first
    assert "VLLM_HOST_IP=10.0.0.2" in second and "--headless" in second
    assert "--master-addr 10.0.0.1" in second and "OMP_NUM_THREADS=4" in second


def test_preflight_names_the_host_missing_the_model_or_differing(tmp_path):
    hostfile = read_hostfile(_write(tmp_path, [{"ssh": "a", "ips": ["127.0.0.1"]},
                                                {"ssh": "b", "ips": ["127.0.0.1"]}]))
    model = str(tmp_path)
    here = host_report(model, "127.0.0.1")
    missing = host_report(str(tmp_path / "absent"), "127.0.0.1")
    other = {**here, "versions": {**here["versions"], "mlx": "0.0.1"}}
    assert check_reports(model, hostfile, [here, here]) == []
    assert "model path" in check_reports(model, hostfile, [here, missing])[0]
    assert "missing on host 1 (b)" in check_reports(model, hostfile, [here, missing])[0]
    mismatch = check_reports(model, hostfile, [here, other])[0]
    assert "version mismatch on host 1 (b)" in mismatch and "0.0.1" in mismatch
    foreign = host_report(model, "192.0.2.77")  # TEST-NET: not an address of this host
    assert not foreign["owns_address"]
    assert 'host 1 (b) has no address 127.0.0.1: fix its "ips"' in check_reports(
        model, hostfile, [here, foreign])[0]


def test_ranks_compare_versions():
    mine = software_versions()
    ranks = [{"rank": 0, "host": "10.0.0.1", "versions": mine},
             {"rank": 1, "host": "10.0.0.2", "versions": {**mine, "vllm": "0.1.0"}}]
    with pytest.raises(DistributedError, match="version mismatch between hosts: vllm"):
        _check_versions(ranks)


@requires_tool(can_simulate_hosts())
def test_rank_that_cannot_reach_the_coordinator(tiny_model, tmp_path):
    model = tiny_model("llama")
    with SimulatedHosts(2) as hosts:
        start = time.monotonic()
        done = subprocess.run(
            ["ip", "netns", "exec", hosts.names[1], "env", f"VLLM_HOST_IP={hosts.addresses[1]}",
             "VLLM_METAL_CONNECT_TIMEOUT=3", sys.executable, "-m", "vllm.entrypoints.cli.main",
             "serve", model, "--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", "1",
             "--master-addr", "10.255.255.1", "--master-port", str(free_port()), "--headless",
             "--kv-cache-memory-bytes", "64M", "--dtype", "float32"],
            capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "cannot reach the coordinator at 10.255.255.1" in output, output[-3000:]
    assert seconds < 60


def test_ranks_compare_the_settings_they_must_share():
    mine = {"rank": 0, "host": "10.0.0.1", "settings": {"VLLM_METAL_BATCH_PROMPTS": "1"}}
    other = {"rank": 1, "host": "10.0.0.2", "settings": {"VLLM_METAL_BATCH_PROMPTS": "0"}}
    _check_settings([mine, {**other, "settings": mine["settings"]}])
    with pytest.raises(DistributedError, match="VLLM_METAL_BATCH_PROMPTS differs between ranks: "
                                               r"1 on rank 0 \(10.0.0.1\) vs 0 on rank 1"):
        _check_settings([mine, other])


@requires_tool(can_simulate_hosts())
def test_hosts_whose_settings_differ_stop_naming_the_setting(tiny_model, tmp_path):
    """Two hosts started by hand, one with prompts batched and one without: each
    rank would run a different number of forwards (and so of collectives)."""
    model = tiny_model("llama")
    master_port = free_port()
    with SimulatedHosts(2) as hosts:
        start = time.monotonic()
        procs = []
        for rank, batch_prompts in ((0, "1"), (1, "0")):
            command = ["ip", "netns", "exec", hosts.names[rank], "env",
                       f"VLLM_HOST_IP={hosts.addresses[rank]}",
                       f"VLLM_METAL_BATCH_PROMPTS={batch_prompts}", sys.executable, "-m",
                       "vllm.entrypoints.cli.main", "serve", model, "--tensor-parallel-size", "2",
                       "--nnodes", "2", "--node-rank", str(rank), "--master-addr",
                       hosts.addresses[0], "--master-port", str(master_port),
                       "--kv-cache-memory-bytes", "64M", "--dtype", "float32"]
            if rank == 0:
                command += ["--port", str(free_port())]
            else:
                command.append("--headless")
            procs.append(subprocess.Popen(command, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = []
        try:
            for proc in procs:
                outputs.append(proc.communicate(timeout=150)[0])
        finally:
            for proc in procs:
                proc.kill()
        seconds = time.monotonic() - start
    assert all(proc.returncode != 0 for proc in procs)
    expected = ("VLLM_METAL_BATCH_PROMPTS differs between ranks: 1 on rank 0 "
                f"({hosts.addresses[0]}) vs 0 on rank 1 ({hosts.addresses[1]})")
    assert all(expected in output for output in outputs), [o[-3000:] for o in outputs]
    assert seconds < 120


def _write(tmp_path, hosts) -> str:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"hosts": hosts}))
    return str(path)
