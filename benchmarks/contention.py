"""CPU time used by processes outside this run, so a result taken while the
machine was shared can be flagged (on 2 cores, one busy neighbour halves MLX's speed)."""

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def _descendants(table: dict, root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children.get(pid, []))
    return found


class ForeignCpu:
    """``with ForeignCpu() as watch: ...`` then ``watch.seconds``: CPU seconds that
    processes outside this process tree used meanwhile (ones that lived through
    the whole block, or started in it and were still alive at its end)."""

    def __enter__(self):
        self.before = self._foreign()
        return self

    def __exit__(self, *exc):
        after = self._foreign()
        self.seconds = sum(cpu - self.before.get(pid, 0.0) for pid, cpu in after.items()
                           if cpu >= self.before.get(pid, 0.0))
        return False

    @staticmethod
    def _foreign() -> dict[int, float]:
        if not Path("/proc/self/stat").exists():
            return {}
        table = _processes()
        ours = _descendants(table, os.getpid())
        return {pid: cpu for pid, (_, cpu) in table.items() if pid not in ours}


def share_of_machine(cpu_seconds: float, wall_seconds: float) -> float:
    """Foreign CPU time as a share of all cores over the wall time (0 = machine to ourselves)."""
    return cpu_seconds / max(wall_seconds * (os.cpu_count() or 1), 1e-9)
