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

# The real-cell data set lives beside the clone (…/shared/data/real_cells), not inside it.
REAL_CELLS = Path(__file__).resolve().parents[1].parent / "shared/data/real_cells"


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
    from pathloop.phantoms import write_phantoms

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
