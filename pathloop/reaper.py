"""Reap a local Ray instance when the driver that started it dies, even by SIGKILL.

``ray.init()`` of a new local instance spawns gcs_server, raylet, dashboard and log monitor from
the driver, and the raylet spawns its agents (ray::DashboardAgent, ray::RuntimeEnvAgent) and
workers. Ray ties the first group to the driver's life, but a SIGKILLed driver leaves the agents
running forever (Ray 2.60; they also ignore SIGTERM). ``init_ray`` starts a tiny watcher beside a
new local instance: once the driver is gone it terminates every process of that Ray session
(SIGTERM, then SIGKILL after a grace period) and exits. A driver that exits normally has already
shut Ray down, so the watcher then finds nothing and exits too.

Linux only (it reads /proc); elsewhere ``init_ray`` is plain ``ray.init``. The watcher runs as
``python -m pathloop.reaper <driver pid> <session dir> <node id>`` and imports only the standard
library: psutil ships only inside Ray (ray/thirdparty_files), and importing Ray would cost the
watcher ~3 s and ~70 MB.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

POLL_S = 1.0  # how often the watcher checks that the driver is alive
GRACE_S = 5.0  # SIGTERM -> SIGKILL; Ray's agents ignore SIGTERM, so keep this short
ROUNDS = 3  # a raylet still alive may spawn a worker between scan and kill; rescan this often


_watched: set[str] = set()  # session dirs this process already started a watcher for


def init_ray(**kwargs: Any) -> Any:
    """``ray.init(**kwargs)``; when this process started a local Ray instance (not when it is
    connected to a running cluster), also start, once per instance, a watcher that reaps the
    instance's processes if this driver dies without shutting Ray down (SIGKILL, OOM killer).

    With ``ignore_reinit_error=True`` this also covers an instance Ray started implicitly
    before (Ray Data's readers call ``ray.init()`` on first use, e.g. in ``run_pretrain``)."""
    import ray

    ctx = ray.init(**kwargs)
    # Private but long-stable (Ray 2.x): the driver's Node is the head only when this process
    # started the instance; connecting to a cluster (address, RAY_ADDRESS, ray://) is not.
    node = getattr(ray._private.worker, "_global_node", None)
    if sys.platform.startswith("linux") and node is not None and node.is_head():
        info = ctx.address_info
        if info["session_dir"] not in _watched:
            _spawn(info["session_dir"], info["node_id"])
            _watched.add(info["session_dir"])
    return ctx


def _spawn(session_dir: str, node_id: str) -> None:
    """Start the watcher as a child of this driver, in its own session so a Ctrl-C or a kill of
    the driver's process group spares it; stdout closed so it never holds a caller's pipe."""
    log = Path(session_dir) / "logs" / "pathloop_reaper.err"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pathloop.reaper", str(os.getpid()), session_dir, node_id]
    with open(log, "ab") as err:
        subprocess.Popen(
            cmd,
            cwd=Path(__file__).resolve().parents[1],  # -m resolves this same pathloop
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


# ---- the watcher ---------------------------------------------------------------------------


def _belongs(pid: int, session_dirs: tuple[str, ...], node_env: bytes) -> bool:
    """Whether process ``pid`` is part of the Ray session: the session dir on its command line
    (gcs_server, raylet, dashboard, monitors), its node id in its environment (agents and
    workers rename themselves ray::...), or a file open under the session dir (their logs)."""
    proc = f"/proc/{pid}"
    try:
        with open(f"{proc}/cmdline", "rb") as f:
            cmdline = f.read()
        if any(d.encode() in cmdline for d in session_dirs):
            return True
        with open(f"{proc}/environ", "rb") as f:
            if node_env in f.read().split(b"\0"):
                return True
        for fd in os.listdir(f"{proc}/fd"):
            target = os.readlink(f"{proc}/fd/{fd}")
            if any(target.startswith(d + "/") for d in session_dirs):
                return True
    except OSError:  # exited meanwhile, or another user's process we cannot read
        return False
    return False


def session_pids(session_dir: str, node_id: str) -> list[int]:
    """Live processes of the Ray session rooted at ``session_dir`` (node ``node_id``), but not
    this process."""
    dirs = tuple({session_dir.rstrip("/"), os.path.realpath(session_dir)})
    node_env = f"RAY_NODE_ID={node_id}".encode()
    me = os.getpid()
    pids = (int(e) for e in os.listdir("/proc") if e.isdigit())
    return [p for p in pids if p != me and _belongs(p, dirs, node_env)]


def _alive(pid: int) -> bool:
    """Running and not a zombie (an exited child waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]  # comm may hold spaces and ")"
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def reap(session_dir: str, node_id: str, grace_s: float = GRACE_S) -> int:
    """Terminate every process of the session: SIGTERM, then SIGKILL for those still alive after
    ``grace_s``. Returns how many processes were signalled."""
    n = 0
    for _ in range(ROUNDS):
        pids = session_pids(session_dir, node_id)
        if not pids:
            break
        n += len(pids)
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal([p for p in pids if _alive(p)], signal.SIGKILL)
    return n


def watch(driver_pid: int, session_dir: str, node_id: str) -> int:
    """Wait for the driver to die, then reap its Ray session. The watcher is the driver's child,
    so the driver is gone once the watcher is re-parented; no pid-reuse race."""
    while os.getppid() == driver_pid:
        time.sleep(POLL_S)
    n = reap(session_dir, node_id)
    if n:
        print(f"pathloop.reaper: driver {driver_pid} gone; reaped {n} processes", file=sys.stderr)
    return n


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2], sys.argv[3])
