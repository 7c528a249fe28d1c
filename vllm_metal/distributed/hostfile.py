"""MLX's hostfile, as ``mlx.distributed_config`` writes it:

    {"backend": "ring" | "jaccl",
     "envs": ["NAME=value", ...],
     "hosts": [{"ssh": "mac1.local", "ips": ["10.0.0.1"], "rdma": [null, "rdma_en3"]}, ...]}

A bare list of hosts is accepted too. ``ips[0]`` is the address the other hosts
reach this one at; ``rdma[j]`` names the RDMA device that links to host j (JACCL).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path


class HostfileError(ValueError):
    pass


@dataclass
class Host:
    ssh: str
    ips: list[str]
    rdma: list[str | None] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.ips[0]


@dataclass
class Hostfile:
    hosts: list[Host]
    backend: str = "ring"
    envs: list[str] = field(default_factory=list)


def read_hostfile(path: str) -> Hostfile:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise HostfileError(f"cannot read hostfile {path}: {error.strerror}") from error
    except json.JSONDecodeError as error:
        raise HostfileError(f"hostfile {path} is not valid JSON: {error}") from error
    if isinstance(data, list):
        data = {"hosts": data}
    if not isinstance(data, dict) or not isinstance(data.get("hosts"), list) or not data["hosts"]:
        raise HostfileError(f"hostfile {path} needs a non-empty \"hosts\" list")
    backend = data.get("backend") or "ring"
    if backend not in ("ring", "jaccl"):
        raise HostfileError(f"hostfile {path}: backend {backend!r} is not ring or jaccl")
    envs = data.get("envs") or []
    for entry in envs:
        if not isinstance(entry, str) or "=" not in entry:
            raise HostfileError(f"hostfile {path}: envs entry {entry!r} is not NAME=value")
    hosts = []
    for i, entry in enumerate(data["hosts"]):
        if not isinstance(entry, dict) or not entry.get("ssh"):
            raise HostfileError(f"hostfile {path}: host {i} needs an \"ssh\" name")
        ips = entry.get("ips") or []
        if not ips or not all(isinstance(ip, str) and ip for ip in ips):
            raise HostfileError(
                f"hostfile {path}: host {i} ({entry['ssh']}) needs \"ips\", the address the "
                "other hosts reach it at"
            )
        rdma = entry.get("rdma") or []
        if backend == "jaccl" and len(rdma) != len(data["hosts"]):
            raise HostfileError(
                f"hostfile {path}: backend jaccl needs \"rdma\" on host {i} with one entry per "
                "host (null for itself); mlx.distributed_config --backend jaccl writes it"
            )
        hosts.append(Host(entry["ssh"], list(ips), list(rdma)))
    return Hostfile(hosts, backend, list(envs))
