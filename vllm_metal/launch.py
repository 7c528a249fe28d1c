"""Serve one model across hosts: one `vllm serve` per host, rank 0 answers HTTP.

    python -m vllm_metal.launch --hostfile hosts.json -- MODEL [vllm serve args]

Each host runs ``tensor x pipeline parallel size / number of hosts`` ranks, in
vLLM's multi-node mode (``--nnodes``, ``--node-rank``, ``--master-addr``,
``--headless`` on all but the first host). Commands reach a host through
``--remote-exec`` (default ``ssh {ssh}``; ``ip netns exec {ssh}`` or ``""`` for
local runs); ``--print`` prints each host's command for a manual start instead.
Before starting, every host is asked (``distributed/preflight.py``) for its
versions, the model path and its address, so a mismatch stops here, by name.
When any host's process ends, the others are stopped.
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from vllm_metal.distributed.hostfile import Hostfile, HostfileError, read_hostfile

PREFLIGHT_TIMEOUT_S = 60
RANK0_GRACE_S = 6
STOP_GRACE_S = 10
FAILED_STOP_GRACE_S = 2


class LaunchError(RuntimeError):
    pass


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m vllm_metal.launch",
        description="Start vllm serve on every host of an MLX hostfile (rank 0 serves HTTP).",
    )
    parser.add_argument("--hostfile", required=True, help="MLX hostfile (mlx.distributed_config)")
    parser.add_argument("--remote-exec", default="ssh -tt {ssh}",
                        help="command prefix that runs a command on a host; {ssh} is the "
                             "host's ssh name ('' runs locally). ssh's -tt ends the remote "
                             "command when the launcher stops its ssh")
    parser.add_argument("--python", default=sys.executable,
                        help="python with vllm-metal installed, on every host")
    parser.add_argument("--cwd", default=os.getcwd(), help="working directory on every host")
    parser.add_argument("--master-port", type=int, default=29501,
                        help="port of rank 0's coordinator (vLLM's --master-port)")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print each host's command and exit (manual start)")
    parser.add_argument("--skip-preflight", action="store_true")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER,
                        help="-- MODEL [vllm serve arguments]")
    args = parser.parse_args(argv)
    serve = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    if not serve or serve[0].startswith("-"):
        parser.error("give the model after --: ... -- MODEL [vllm serve args]")
    args.model, args.serve = serve[0], serve[1:]
    return args


def _option(args: list[str], name: str) -> str | None:
    args = [a.replace("_", "-") if a.startswith("--") else a for a in args]
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def parallel_sizes(serve: list[str], num_hosts: int) -> tuple[int, int, list[str]]:
    """TP and PP sizes from the serve arguments (TP defaults to one rank per host)."""
    if _option(serve, "--config") is not None:
        raise LaunchError("pass the vllm serve options on the command line, not with --config: "
                          "the launcher reads the parallel sizes from them")
    tp = _option(serve, "--tensor-parallel-size") or _option(serve, "-tp")
    pp = _option(serve, "--pipeline-parallel-size") or _option(serve, "-pp")
    extra = []
    if tp is None and pp is None:
        tp = str(num_hosts)
        extra = ["--tensor-parallel-size", tp]
    tp, pp = int(tp or 1), int(pp or 1)
    if (tp * pp) % num_hosts:
        raise LaunchError(
            f"--tensor-parallel-size {tp} x --pipeline-parallel-size {pp} = {tp * pp} ranks "
            f"do not spread evenly over the hostfile's {num_hosts} hosts: use a multiple of "
            f"{num_hosts} ranks, or list as many hosts as you want ranks per host to divide"
        )
    return tp, pp, extra


def host_commands(args, hostfile: Hostfile) -> list[tuple[dict, list[str]]]:
    """(environment, command) for each host, rank 0's first."""
    hosts = hostfile.hosts
    tp, pp, extra = parallel_sizes(args.serve, len(hosts))
    if hostfile.backend == "jaccl" and tp * pp != len(hosts):
        raise LaunchError("the jaccl backend runs one rank per host: set TP x PP to the "
                          f"number of hosts ({len(hosts)})")
    master = hosts[0].address
    commands = []
    for node_rank, host in enumerate(hosts):
        env = dict(entry.split("=", 1) for entry in hostfile.envs)
        env.update({
            "VLLM_HOST_IP": host.address,
            "VLLM_METAL_DISTRIBUTED_BACKEND": hostfile.backend,
        })
        if hostfile.backend == "jaccl":
            env["MLX_JACCL_COORDINATOR"] = f"{master}:{args.master_port + 1}"
        command = [
            args.python, "-m", "vllm.entrypoints.cli.main", "serve", args.model,
            *args.serve, *extra,
            "--nnodes", str(len(hosts)), "--node-rank", str(node_rank),
            "--master-addr", master, "--master-port", str(args.master_port),
        ]
        if node_rank > 0:
            command.append("--headless")
        commands.append((env, command))
    return commands


def shell_script(args, hostfile: Hostfile, env: dict, command: list[str]) -> str:
    script = f"cd {shlex.quote(args.cwd)} && "
    script += "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
    if hostfile.backend == "jaccl":
        devices = json.dumps([h.rdma for h in hostfile.hosts])
        script += (f"MLX_IBV_DEVICES=$(mktemp); echo {shlex.quote(devices)} > "
                   "$MLX_IBV_DEVICES; export MLX_IBV_DEVICES; ")
    return script + "exec " + " ".join(shlex.quote(c) for c in command)


def on_host(remote_exec: str, ssh: str, script: str) -> list[str]:
    prefix = shlex.split(remote_exec.format(ssh=ssh))
    if not prefix:
        return ["bash", "-c", script]
    if any(os.path.basename(token) == "ssh" for token in prefix):
        return [*prefix, "bash -c " + shlex.quote(script)]
    return [*prefix, "bash", "-c", script]


def preflight(args, hostfile: Hostfile) -> None:
    """Ask every host at once; stop with a message naming the host that differs."""
    reports, errors = {}, []

    def ask(i, host):
        script = (f"cd {shlex.quote(args.cwd)} && exec {shlex.quote(args.python)} -m "
                  f"vllm_metal.distributed.preflight {shlex.quote(args.model)} "
                  f"{shlex.quote(host.address)}")
        try:
            done = subprocess.run(on_host(args.remote_exec, host.ssh, script),
                                  capture_output=True, text=True, timeout=PREFLIGHT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            errors.append(f"host {i} ({host.ssh}) did not answer within {PREFLIGHT_TIMEOUT_S} s")
            return
        lines = done.stdout.strip().splitlines()
        try:
            if done.returncode != 0 or not lines:
                raise ValueError
            reports[i] = json.loads(lines[-1])
        except ValueError:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            errors.append(f"host {i} ({host.ssh}) could not run {args.python} with vllm-metal "
                          f"in {args.cwd}: {tail[0]} (check --remote-exec, --python, --cwd and "
                          "the install there)")

    threads = [threading.Thread(target=ask, args=(i, h)) for i, h in enumerate(hostfile.hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise LaunchError("; ".join(errors))
    errors = check_reports(args.model, hostfile, [reports[i] for i in range(len(reports))])
    if errors:
        raise LaunchError("; ".join(errors))


def check_reports(model: str, hostfile: Hostfile, reports: list[dict]) -> list[str]:
    """What the hosts' preflight reports disagree on, each naming the host and the fix."""
    errors = []
    first = reports[0]["versions"]
    local_model = reports[0]["model_found"]  # else a model id each host resolves itself
    for i, host in enumerate(hostfile.hosts):
        report = reports[i]
        if local_model and not report["model_found"]:
            errors.append(f"model path {model} is missing on host {i} ({host.ssh}): copy "
                          "it there, to the same path")
        if not report["owns_address"]:
            errors.append(f"host {i} ({host.ssh}) has no address {host.address}: fix its "
                          "\"ips\" in the hostfile")
        if report["versions"] != first:
            diff = ", ".join(f"{name} {first[name]} on host 0 vs {report['versions'].get(name)}"
                             for name in first if report["versions"].get(name) != first[name])
            errors.append(f"version mismatch on host {i} ({host.ssh}): {diff}; install the "
                          "same versions on every host")
    return errors


def run(args, hostfile: Hostfile) -> int:
    processes: list[subprocess.Popen] = []

    def stop_all(grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to every host's process group (also where its leader has exited:
        its children may not have), SIGKILL after ``grace_s``."""
        for p in processes:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in processes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)

    stopping = lambda *_: (stop_all(), sys.exit(143))
    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGHUP, stopping)
    for node_rank, ((env, command), host) in enumerate(zip(host_commands(args, hostfile),
                                                             hostfile.hosts)):
        argv = on_host(args.remote_exec, host.ssh, shell_script(args, hostfile, env, command))
        processes.append(subprocess.Popen(argv, start_new_session=True,
                                          stdin=subprocess.DEVNULL))
        print(f"[launch] host {node_rank} ({host.ssh}, {host.address}) started "
              f"{'(serves HTTP)' if node_rank == 0 else '(headless)'}", flush=True)

    try:
        while True:
            for node_rank, p in enumerate(processes):
                code = p.poll()
                if code is not None:
                    print(f"[launch] host {node_rank} ({hostfile.hosts[node_rank].ssh}) exited "
                          f"with code {code}; stopping the other hosts", flush=True)
                    if node_rank > 0:
                        # Rank 0 notices the lost rank itself: let it fail the open
                        # requests and say which rank is gone before it is stopped.
                        _wait_quietly(processes[0], RANK0_GRACE_S)
                    # The engine has failed: a rank that is stopped or hung would hold
                    # its host's orderly shutdown for the full grace.
                    stop_all(FAILED_STOP_GRACE_S)
                    return code or (1 if node_rank else 0)
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 130
    finally:
        stop_all()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_quietly(process: subprocess.Popen, seconds: float) -> None:
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        pass


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        hostfile = read_hostfile(args.hostfile)
        if args.print_only:
            for i, ((env, command), host) in enumerate(zip(host_commands(args, hostfile),
                                                           hostfile.hosts)):
                print(f"# host {i} ({host.ssh})")
                print(shell_script(args, hostfile, env, command))
            return 0
        host_commands(args, hostfile)  # sizes checked before anything starts
        if not args.skip_preflight:
            preflight(args, hostfile)
        return run(args, hostfile)
    except (HostfileError, LaunchError) as error:
        print(f"vllm_metal.launch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
