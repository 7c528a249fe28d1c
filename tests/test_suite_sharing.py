"""The suite's own sharing rules (``conftest.machine_share``): under two xdist
workers a module in ``EXCLUSIVE`` runs with no other test at once, while other
tests run two at a time. Checked on a scratch suite with this conftest."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TIMED_TEST = """
import json, os, time
import pytest

@pytest.mark.parametrize("i", range({count}))
def test_timed(i):
    start = time.monotonic()
    time.sleep({seconds})
    with open(os.environ["SPANS"], "a") as log:
        log.write(json.dumps(["{kind}", start, time.monotonic()]) + "\\n")
"""


def spans_of_a_run(tmp_path: Path, module_name: str) -> dict:
    """Runs ``module_name`` (two 1-second tests) beside four other modules (three
    0.5-second tests each) on two workers, a module on one worker as the suite runs
    (``--dist loadfile``); returns each kind's (start, end) spans."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / module_name).write_text(TIMED_TEST.format(count=2, seconds=1.0, kind="watched"))
    for name in "abcd":
        (tmp_path / f"test_zz_shared_{name}.py").write_text(
            TIMED_TEST.format(count=3, seconds=0.5, kind="shared"))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the project's addopts
    spans = tmp_path / "spans.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
         "--dist", "loadfile", "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path),
         str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "SPANS": str(spans)},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = {"watched": [], "shared": []}
    for line in spans.read_text().splitlines():
        kind, start, end = json.loads(line)
        found[kind].append((start, end))
    assert len(found["watched"]) == 2 and len(found["shared"]) == 12
    return found


def test_an_exclusive_module_runs_alone_while_the_others_run_two_at_once(tmp_path):
    """``test_readme.py`` is in ``EXCLUSIVE``: while its tests run (on one worker),
    the other worker runs none, though it runs the shared tests beside the first."""
    spans = spans_of_a_run(tmp_path, "test_readme.py")
    first = min(start for start, _ in spans["watched"])
    last = max(end for _, end in spans["watched"])
    assert not [s for s in spans["shared"] if s[0] < last and s[1] > first], spans
    one, two = sorted(spans["watched"])
    assert two[0] >= one[1], "the exclusive module's own tests ran at once"
    shared = sorted(spans["shared"])
    assert any(later[0] < earlier[1] for earlier, later in zip(shared, shared[1:])), \
        "the shared tests never ran two at once"
