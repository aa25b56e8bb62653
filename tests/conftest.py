"""Test harness: offline, quiet environment and the fixtures shared by every test module.

Setting the environment here (at import of conftest, before any test imports Ray or Hugging Face)
is the harness's job; library code never reads or sets it at import.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download weights
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage reporting from CI
# Ray Train's controller polls its workers every 2 s, so every fit ends up to 2 s after its
# last step; the suite's tiny fits cost mostly such start-up and wind-down.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# The real-cell data set lives beside the clone (…/shared/data/real_cells), not inside it.
REAL_CELLS = Path(__file__).resolve().parents[1].parent / "shared/data/real_cells"


def phantom_batch(per_class: int, size: int, seed: int, classes: list[int] | None = None) -> tuple:
    """Freshly rendered phantoms: images (N, H, W, 3), class ids (N,), subtypes (N,)."""
    import numpy as np

    from pathloop.phantoms import generate

    images, ids, subtypes = zip(*generate(per_class, size, seed, classes), strict=True)
    return np.stack(images), np.array(ids), list(subtypes)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """One local Ray instance for the whole test session (starting Ray costs seconds)."""
    import ray

    # 4 logical CPUs on a 2-core box: two 1-CPU Train workers still leave Ray Data's readers a CPU.
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def real_cells() -> Path:
    """The 3,200 real PBC cell images (8 classes, 64 px) with LABELS.csv; skip when absent."""
    if not (REAL_CELLS / "LABELS.csv").is_file():
        pytest.skip(f"real cells not present at {REAL_CELLS}; CI has them beside the clone")
    return REAL_CELLS


@pytest.fixture(scope="session")
def phantom_shards(tmp_path_factory) -> Path:
    """A small phantom shard set: 16 classes × (8 train + 2 test) at 32 px, seed 11."""
    from pathloop.scenarios import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, per_class=8, test_per_class=2, size=32, seed=11)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """An untrained tiny UNet checkpoint (16 classes, 32 px, (16, 32) channels) at step 3."""
    from pathloop.config import ModelConfig, NoiseConfig
    from pathloop.diffusion import build_unet, save_checkpoint
    from pathloop.vocab import BONE_MARROW_16

    out = tmp_path_factory.mktemp("ckpt")
    model = ModelConfig(block_out_channels=(16, 32), layers_per_block=1)
    save_checkpoint(
        out,
        build_unet(model, 16),
        step=3,
        vocab=BONE_MARROW_16,
        config={
            "model": model.model_dump(mode="json"),
            "noise": NoiseConfig().model_dump(mode="json"),
        },
    )
    return out


class LocalRayCluster:
    """A real one-node Ray cluster on 127.0.0.1 for job-submission tests, beside ``ray_session``.

    ``ray start --head --block`` runs as the leader of its own process group, with free ports
    (GCS, dashboard, client server, dashboard agent) and its own short temp dir, so it neither
    collides with ``ray_session`` nor becomes the machine's "current cluster" that a bare
    ``ray.init()`` would join. Stopping terminates that process (Ray's own shutdown), then kills
    what is left of its group. Never ``ray stop``: it stops every Ray on the machine.
    """

    def __init__(self, num_cpus: int = 2) -> None:
        import sys
        import tempfile

        self.num_cpus = num_cpus
        self.root = Path(tempfile.mkdtemp(prefix="plray-", dir="/tmp"))  # sockets: short paths
        bin_dir = str(Path(sys.executable).parent)
        # The jobs' `python` is this venv's; no token auth on a loopback-only test cluster.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.env.update(PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="disabled")
        self.ray = str(Path(bin_dir) / "ray")
        self.proc = None
        self.url = ""

    @staticmethod
    def _free_port() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def start(self, timeout: float = 240) -> LocalRayCluster:
        import subprocess
        import time
        import urllib.request

        gcs, dash, client, agent = (self._free_port() for _ in range(4))
        cmd = [self.ray, "start", "--head", "--block", "--disable-usage-stats"]
        cmd += ["--node-ip-address", "127.0.0.1", "--port", str(gcs)]
        cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
        cmd += ["--ray-client-server-port", str(client)]
        cmd += ["--dashboard-agent-listen-port", str(agent)]
        cmd += ["--num-cpus", str(self.num_cpus), "--temp-dir", str(self.root / "ray")]
        self._log = (self.root / "ray-start.log").open("w")
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.root / 'ray-start.log').read_text()}")
            try:  # the Jobs API answers once the dashboard's job module is up
                urllib.request.urlopen(f"{self.url}/api/jobs/", timeout=5)
                return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"local Ray cluster not up after {timeout}s")

    def submit(self, working_dir: Path, *entrypoint: str, timeout: float = 900):
        """``ray job submit --working-dir`` and wait; returns the CompletedProcess. A job still
        running after ``timeout`` s is stopped and fails the test with its log's tail."""
        import subprocess
        import uuid

        job_id = f"pathloop-test-{uuid.uuid4().hex[:8]}"
        ray_job = [self.ray, "job"]
        cmd = [*ray_job, "submit", "--address", self.url, "--submission-id", job_id]
        cmd += ["--working-dir", str(working_dir), "--", *entrypoint]
        try:
            return subprocess.run(
                cmd, env=self.env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            logs = subprocess.run(
                [*ray_job, "logs", "--address", self.url, job_id],
                env=self.env,
                capture_output=True,
                text=True,
            ).stdout
            subprocess.run([*ray_job, "stop", "--address", self.url, job_id], env=self.env)
            pytest.fail(f"job {job_id} still running after {timeout}s; log tail:\n{logs[-3000:]}")

    def stop(self, grace: float = 5) -> None:
        import shutil
        import signal
        import subprocess

        if self.proc is not None:
            # `ray start --block` shuts its processes down on SIGTERM, but once a Ray Data job
            # has run it waits 30 s on Ray Data's detached actors; this throwaway cluster's group
            # is killed after `grace` instead (its temp dir goes with it)
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever outlived the graceful stop, in this cluster's group only
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """A local Ray cluster (2 CPUs) to submit jobs to with the Ray Jobs CLI; see LocalRayCluster.
    Stopped after its module: idle, its twenty processes would go on taking CPU from the rest of
    the suite."""
    cluster = LocalRayCluster(num_cpus=2).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny CNNs: they gain little from a second thread, and on
    a shared 2-core box two spinning threads can cost 10x. Restored for the other modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
