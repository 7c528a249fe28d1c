"""Hosts simulated on one machine: Linux network namespaces, each with its own
address on a private subnet, joined by a bridge (a switch) in one more namespace.
The calling process gets an address on the same subnet, so it can be the client.

    with SimulatedHosts(3) as hosts:
        hosts.names      # ["vm1234h0", ...] (for `ip netns exec NAME ...`)
        hosts.addresses  # ["10.204.234.1", ...]
"""

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# Each live set of simulated hosts has a file here naming its owner's pid and its
# namespaces, so a set whose owner died without cleaning up (a test run killed) is
# removed by the next one, and no two sets share a name or a subnet.
STATE = Path(tempfile.gettempdir()) / "vllm-metal-netns"
SETS = 12500  # distinct subnets 10.200-249.0-249


def can_simulate_hosts() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _ip_out(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True).stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(links: list[str], namespaces: list[str]) -> None:
    for link in links:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    for name in namespaces:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _reap_orphans() -> None:
    """Remove the sets whose owner process is gone."""
    for record in STATE.glob("*.json"):
        try:
            owner = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if not _alive(owner["pid"]):
            _remove(owner["links"], owner["namespaces"])
            record.unlink(missing_ok=True)


def _subnets_in_use() -> set[str]:
    """The /24 subnets (``a.b.c``) this namespace already has addresses or routes in."""
    text = _ip_out("-4", "route") + _ip_out("-4", "-o", "addr")
    return set(re.findall(r"\b(\d+\.\d+\.\d+)\.\d+", text))


class SimulatedHosts:
    def __init__(self, count: int):
        self.count = count

    def _choose(self) -> None:
        """A prefix and subnet no other set (live, or left by a dead process) has; from
        this process's pid first, so concurrent test workers seldom try the same one."""
        names = set(_ip_out("netns", "list").split())
        links = _ip_out("-o", "link")
        used = _subnets_in_use()
        start = os.getpid() % SETS
        for offset in range(SETS):
            n = (start + offset) % SETS
            prefix, subnet = f"vm{n}", f"10.{200 + n // 250}.{n % 250}"
            if (subnet not in used and f"{prefix}sw" not in names
                    and not re.search(rf"\b{prefix}[a-z]", links)):
                break
        else:
            raise RuntimeError("no free subnet for simulated hosts: remove stale vm* namespaces")
        self.prefix = prefix
        self.switch = f"{prefix}sw"
        self.names = [f"{prefix}h{i}" for i in range(self.count)]
        self.addresses = [f"{subnet}.{i + 1}" for i in range(self.count)]
        self.client_address = f"{subnet}.254"
        self._client_link = f"{prefix}c"

    def __enter__(self) -> "SimulatedHosts":
        STATE.mkdir(exist_ok=True)
        with open(STATE / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one set chosen and made at a time
            _reap_orphans()
            self._choose()
            self._record = STATE / f"{self.prefix}.json"
            self._record.write_text(json.dumps({
                "pid": os.getpid(), "links": [self._client_link],
                "namespaces": [*self.names, self.switch]}))
            try:
                self._create()
            except Exception:
                self.__exit__()
                raise
        return self

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (name, address) in enumerate(zip(self.names, self.addresses)):
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
            self._wire(f"{self.prefix}a{i}", f"{self.prefix}b{i}", name, address)
        # The caller's own namespace joins the switch too, as the client.
        self._wire(self._client_link, f"{self.prefix}cb", None, self.client_address)

    def _wire(self, host_end: str, switch_end: str, namespace: str | None, address: str) -> None:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", switch_end)
        _ip("link", "set", switch_end, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", switch_end, "master", "br0")
        _ip("-n", self.switch, "link", "set", switch_end, "up")
        where = ["-n", namespace] if namespace else []
        if namespace:
            _ip("link", "set", host_end, "netns", namespace)
        _ip(*where, "addr", "add", f"{address}/24", "dev", host_end)
        _ip(*where, "link", "set", host_end, "up")

    def __exit__(self, *exc) -> None:
        _remove([self._client_link], [*self.names, self.switch])
        self._record.unlink(missing_ok=True)

    def hostfile(self, backend: str = "ring", envs: list[str] | None = None) -> dict:
        """An MLX hostfile for these hosts (ssh names are the namespace names)."""
        return {
            "backend": backend,
            "envs": envs or [],
            "hosts": [{"ssh": name, "ips": [address], "rdma": []}
                      for name, address in zip(self.names, self.addresses)],
        }
