"""Hosts simulated in network namespaces (``vllm_metal.testing.netns``), as the Ray,
multi-host and stalled-rank tests use them: each set on a subnet of its own, reachable
from this process; a set whose owner died (a killed test run) taken away by the next;
a subnet already routed here under another name (a set made before these records)
never reused."""

import json
import os
import socket
import subprocess
import sys

from conftest import requires_tool

from vllm_metal.testing import netns
from vllm_metal.testing.netns import SimulatedHosts, can_simulate_hosts


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def reaches(hosts: SimulatedHosts, host: int) -> bool:
    """A listener in host ``host``'s namespace answers this process."""
    address = hosts.addresses[host]
    listener = subprocess.Popen(
        ["ip", "netns", "exec", hosts.names[host], sys.executable, "-c",
         f"import socket; s = socket.socket(); s.bind(('{address}', 7070)); s.listen(); "
         f"print('up', flush=True); s.accept()"], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "up"
        with socket.create_connection((address, 7070), timeout=5):
            return True
    except OSError:
        return False
    finally:
        listener.kill()
        listener.wait()


@requires_tool(can_simulate_hosts())
def test_two_sets_get_their_own_subnets_and_each_is_reachable():
    with SimulatedHosts(2) as first, SimulatedHosts(1) as second:
        assert first.prefix != second.prefix
        assert first.addresses[0].rsplit(".", 1)[0] != second.addresses[0].rsplit(".", 1)[0]
        assert reaches(first, 1) and reaches(second, 0)
    assert first.switch not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                              text=True).stdout


@requires_tool(can_simulate_hosts())
def test_a_set_left_by_a_dead_process_is_removed_by_the_next_one():
    """Without a record (no owner known) such a set stays, and a new one takes another
    name; with its dead owner's record, the next set removes its namespaces and link."""
    with SimulatedHosts(1) as left:
        record = json.loads(left._record.read_text())
    try:
        # The same set again, as a killed run leaves it: namespaces, link and record.
        for name in record["namespaces"]:
            subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "link", "add", left._client_link, "type", "veth", "peer", "name",
                        f"{left.prefix}cb"], check=True)
        subprocess.run(["ip", "addr", "add", f"{left.client_address}/24", "dev",
                        left._client_link], check=True)
        for link in (left._client_link, f"{left.prefix}cb"):
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
        netns.STATE.mkdir(exist_ok=True)
        orphan = netns.STATE / f"{left.prefix}.json"
        subnet = left.client_address.rsplit(".", 1)[0]
        # With no record (no owner known), it stays, and a new set takes another name.
        hosts = SimulatedHosts(1)
        hosts._choose()
        assert hosts.prefix != left.prefix
        # Then with the record of its dead owner: the next set removes it.
        orphan.write_text(json.dumps({**record, "pid": dead_pid()}))
        with SimulatedHosts(1):
            pass
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(name in listed.split() for name in record["namespaces"])
        assert subnet not in netns._subnets_in_use()
        assert not orphan.exists()
    finally:
        subprocess.run(["ip", "link", "del", left._client_link], capture_output=True)
        for name in record["namespaces"]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@requires_tool(can_simulate_hosts())
def test_a_live_owners_set_is_kept():
    with SimulatedHosts(1) as hosts:
        with SimulatedHosts(1):
            pass
        assert hosts.names[0] in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                text=True).stdout
        assert json.loads(hosts._record.read_text())["pid"] == os.getpid()
        assert reaches(hosts, 0)


@requires_tool(can_simulate_hosts())
def test_a_subnet_routed_here_under_another_name_is_not_taken():
    """As a set made by other code, or before these records, would be."""
    probe = SimulatedHosts(1)
    probe._choose()
    subnet = probe.client_address.rsplit(".", 1)[0]
    try:
        subprocess.run(["ip", "link", "add", "vmoldc", "type", "veth", "peer", "name", "vmoldcb"],
                       check=True)
        subprocess.run(["ip", "addr", "add", f"{subnet}.254/24", "dev", "vmoldc"], check=True)
        for link in ("vmoldc", "vmoldcb"):
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
        with SimulatedHosts(1) as hosts:
            assert hosts.client_address.rsplit(".", 1)[0] != subnet
            assert reaches(hosts, 0)
    finally:
        subprocess.run(["ip", "link", "del", "vmoldc"], capture_output=True)
