"""The GPU path: bf16 autocast, channels_last, fused AdamW, torch.compile, DDP through Ray Train,
bf16 sampling, finetuning on the device; and Serve's fractional GPUs (config only: runs anywhere).

Tests marked ``gpu`` need CUDA and are skipped without it (``pytest -m gpu`` on a GPU machine).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pathloop.config import load_config
from pathloop.finetune import FinetuneConfig
from pathloop.harness import build_state, global_draw, train_step
from pathloop.pretrain import PretrainConfig

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; runs on a GPU machine (pytest -m gpu)"
)
TINY = ["model.block_out_channels=[16, 32]", "model.layers_per_block=1", "train.batch_size=8"]


def _cfg(model: type = PretrainConfig, *extra: str):
    return load_config(model, None, [*TINY, *extra])


def _batch(cfg, n: int = 8):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((n, 3, 32, 32), generator=g) * 2 - 1  # (B, C, H, W)
    ids = torch.randint(0, 16, (n,), generator=g)  # (B,)
    return x0, ids, *global_draw(cfg, 0, tuple(x0.shape), 16)


def test_serve_generator_takes_fractional_gpus():
    """Two Generator replicas can share one GPU: num_gpus reaches the replica's resources."""
    from serve.app import build_app
    from serve.args import ServeArgs

    ingress = build_app(ServeArgs(model="unused", num_gpus=0.5, replicas=2))._bound_deployment
    generator = ingress.init_args[1]._bound_deployment
    assert generator.ray_actor_options["num_gpus"] == 0.5 and generator.num_replicas == 2


@pytest.mark.gpu
@needs_cuda
def test_training_state_takes_the_gpu_path():
    cfg = _cfg(PretrainConfig, "train.bf16=true", "train.channels_last=true")
    st = build_state(cfg, 16, torch.device("cuda"))
    assert st.autocast and st.opt.defaults["fused"]
    assert st.raw.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x0, ids, noise, t, drop = _batch(cfg)
    losses = [float(train_step(st, x0, ids, noise, t, drop, 1.0)) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 1.5


@pytest.mark.gpu
@needs_cuda
def test_compiled_step_matches_eager():
    losses = {}
    for compile_ in (False, True):
        cfg = _cfg(PretrainConfig, f"train.compile={str(compile_).lower()}", "train.bf16=false")
        st = build_state(cfg, 16, torch.device("cuda"))
        losses[compile_] = float(train_step(st, *_batch(cfg), 1.0))
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_cuda_defaults_compile_and_draw_on_the_gpu():
    """compile=auto compiles on CUDA; the global draw is made on the GPU and repeats per step."""
    cfg = _cfg(PretrainConfig)
    dev = torch.device("cuda")
    st = build_state(cfg, 16, dev)
    assert st.model is not st.raw and st.ema.foreach  # torch.compile's wrapper; foreach EMA
    draws = [global_draw(cfg, 5, (8, 3, 32, 32), 16, dev) for _ in range(2)]
    assert all(a.device.type == "cuda" and torch.equal(a, b) for a, b in zip(*draws, strict=True))


@pytest.mark.gpu
@needs_cuda
def test_train_steps_do_not_wait_for_the_gpu():
    """With the batch on the GPU, noise drawn there and the loss left there, a step makes no
    host sync (sync debug mode raises on one)."""
    cfg = _cfg(PretrainConfig, "train.compile=false")
    dev = torch.device("cuda")
    st = build_state(cfg, 16, dev)
    x0, ids = (v.to(dev) for v in _batch(cfg)[:2])

    def step(i: int) -> torch.Tensor:
        return train_step(st, x0, ids, *global_draw(cfg, i, tuple(x0.shape), 16, dev), 1.0)

    step(0)  # first-use allocations and lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(i) for i in range(1, 4)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.stack(losses)))


@pytest.mark.gpu
@needs_cuda
def test_compiled_channels_last_sampling_matches_eager(tiny_ckpt):
    """bf16 sampling with a compiled, channels_last UNet draws the same images (per-image seeds),
    up to bf16 rounding."""
    from pathloop.diffusion import load_checkpoint, sample

    kw = {"steps": 4, "seed": 1, "device": "cuda", "dtype": torch.bfloat16, "batch_size": 4}
    ref, ck = load_checkpoint(tiny_ckpt), load_checkpoint(tiny_ckpt)  # two copies: in place
    eager = sample(ref.unet, ref.noise, [0, 5, 9, 2], **kw)
    fast = sample(ck.unet, ck.noise, [0, 5, 9, 2], channels_last=True, compile=True, **kw)
    assert (fast - eager).abs().mean() < 0.05


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["reward", "dpo"])
def test_finetune_loss_runs_on_the_gpu(method):
    """Inputs, noise and the frozen DPO reference all live on the training device."""
    from pathloop.finetune import finetune_loss

    cfg = _cfg(FinetuneConfig, f"method={method}", "real=unused")
    st = build_state(cfg, 16, torch.device("cuda"))
    ref = copy.deepcopy(st.raw).eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    data = {
        "images": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        "class_ids": np.array([0, 0, 1, 1, 2, 2]),
        "weights": np.linspace(0, 1, 6, dtype=np.float32),
        "pairs": np.array([[0, 1, 1, -1], [2, 3, 1, 1], [4, 5, -1, -1]]),
        "real_images": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "real_class_ids": np.array([0, 1, 2, 3]),
    }
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=st.autocast):
        loss = finetune_loss(cfg, st, ref, data, 0, 0, 1)
    loss.backward()
    assert loss.device.type == "cuda" and torch.isfinite(loss)


@pytest.mark.gpu
@needs_cuda
def test_bf16_sampling_stays_close_to_fp32(tiny_ckpt):
    from pathloop.diffusion import load_checkpoint, sample

    ck = load_checkpoint(tiny_ckpt)
    kw = {"steps": 4, "seed": 1, "device": "cuda"}
    fp32 = sample(ck.unet, ck.noise, [0, 5, 9], **kw)
    bf16 = sample(ck.unet, ck.noise, [0, 5, 9], dtype=torch.bfloat16, **kw)
    assert bf16.shape == fp32.shape and (bf16 - fp32).abs().mean() < 0.05


@pytest.mark.gpu
@needs_cuda
def test_pretrain_ddp_on_every_gpu(ray_session, phantom_shards, tmp_path):
    """Ray Train DDP, one rank per GPU (NCCL), bf16 + channels_last + fused AdamW from config."""
    from pathloop.pretrain import run_pretrain

    n = torch.cuda.device_count()
    cfg = _cfg(
        PretrainConfig,
        f"workdir={tmp_path / 'run'}",
        f"data.shards={phantom_shards}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.register_as=null",
        f"train.batch_size={8 * n}",
        "train.steps=3",
        "train.sample_every=0",
        "preview.steps=1",
        "train.preview_per_class=1",
        "scaling.use_gpu=true",
        f"scaling.num_workers={n}",
    )
    assert run_pretrain(cfg)["step"] == 3
