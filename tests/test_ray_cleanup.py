"""A SIGKILLed driver leaves no process of the local Ray instance it started (pathloop.reaper)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the reaper is Linux-only; runs on Linux (CI)"
)

# The driver: start a new local instance, run one task (so a worker exists too), say so, then
# hang until killed. address="local": never join someone else's `ray start` cluster.
DRIVER = """
import sys, time, ray
from pathloop import reaper
opts = dict(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
            _temp_dir=sys.argv[1])
if sys.argv[2] == "implicit":  # as in run_pretrain: Ray Data starts Ray, then harness.fit
    ray.init(**opts)
    reaper.init_ray(ignore_reinit_error=True)
else:  # as in `pathloop serve`: the helper starts Ray
    reaper.init_ray(**opts)
ray.get(ray.remote(lambda: 1).remote())
print("UP", flush=True)
time.sleep(600)
"""

START_S = 180  # starting Ray takes ~5 s idle, a minute on a loaded 2-core CI box
REAP_S = 30  # the watcher polls every 1 s, then SIGTERM, 5 s grace, SIGKILL


def _procs() -> dict[int, tuple[int, bytes, bytes]]:
    """pid -> (ppid, start time, state) from /proc/<pid>/stat."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(b")")[2].split()  # after comm: state ppid ... starttime (20th)
        out[int(entry)] = (int(fields[1]), fields[19], fields[0])
    return out


def _descendants(root: int) -> dict[int, bytes]:
    """Live descendants of ``root`` as pid -> start time (to tell a reused pid apart)."""
    procs, found, todo = _procs(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start, _) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def _alive(tree: dict[int, bytes]) -> dict[int, str]:
    """Those of ``tree`` still running (not zombies, same start time) -> their command line."""
    procs, out = _procs(), {}
    for pid, start in tree.items():
        if pid in procs and procs[pid][1] == start and procs[pid][2] not in (b"Z", b"X"):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            out[pid] = cmdline.replace(b"\0", b" ").strip()[:120]
    return out


def _wait_up(driver: subprocess.Popen, stdout: Path) -> None:
    deadline = time.monotonic() + START_S
    while "UP" not in stdout.read_text():
        assert driver.poll() is None, f"driver exited {driver.returncode}: {stdout.read_text()}"
        assert time.monotonic() < deadline, f"Ray not up after {START_S} s"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("start", ["helper", "implicit"])
def test_sigkilled_driver_leaves_no_ray_process(start: str) -> None:
    # Short, unique temp dir: Ray's socket paths under it must stay below 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="plray-", dir="/tmp")
    stdout = Path(temp_dir) / "driver.out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    tree: dict[int, bytes] = {}
    with open(stdout, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, temp_dir, start],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
    try:
        _wait_up(driver, stdout)
        time.sleep(2)  # the raylet starts its agents alongside; let them settle
        tree = _descendants(driver.pid)
        names = b" ".join(_alive(tree).values())
        assert b"raylet" in names and b"ray::" in names, f"no local instance: {names!r}"

        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + REAP_S
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(tree), f"left behind after {REAP_S} s: {_alive(tree)}"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        _signal_all(tree)  # whatever this test started and the fix missed
        shutil.rmtree(temp_dir, ignore_errors=True)


def _signal_all(tree: dict[int, bytes]) -> None:
    for pid in _alive(tree):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
