"""Hosts simulated on one machine: Linux network namespaces, each with its own
address on a private subnet, joined by a bridge (a switch) in one more namespace.
The calling process gets an address on the same subnet, so it can be the client.

    with SimulatedHosts(3) as hosts:
        hosts.names      # ["vmh1234n0", ...] (for `ip netns exec NAME ...`)
        hosts.addresses  # ["10.233.x.1", ...]
"""

import os
import shutil
import subprocess


def can_simulate_hosts() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class SimulatedHosts:
    def __init__(self, count: int):
        tag = os.getpid() % 10000
        self.prefix = f"vm{tag}"
        self.switch = f"{self.prefix}sw"
        self.names = [f"{self.prefix}h{i}" for i in range(count)]
        subnet = f"10.{200 + tag % 50}.{tag % 250}"
        self.addresses = [f"{subnet}.{i + 1}" for i in range(count)]
        self.client_address = f"{subnet}.254"
        self._client_link = f"{self.prefix}c"

    def __enter__(self) -> "SimulatedHosts":
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
        subprocess.run(["ip", "link", "del", self._client_link], capture_output=True)
        for name in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def hostfile(self, backend: str = "ring", envs: list[str] | None = None) -> dict:
        """An MLX hostfile for these hosts (ssh names are the namespace names)."""
        return {
            "backend": backend,
            "envs": envs or [],
            "hosts": [{"ssh": name, "ips": [address], "rdma": []}
                      for name, address in zip(self.names, self.addresses)],
        }
