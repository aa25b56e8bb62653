"""harness.py without Ray: the global draw, the step's defaults and its loss, the step loop's
reports. Tiny UNets (16/32 channels, batch 8), a few steps; the whole file runs in seconds."""

from __future__ import annotations

import pytest
import torch

from pathloop.config import ConfigError, load_config
from pathloop.pretrain import PretrainConfig

TINY = ["model.block_out_channels=[16, 32]", "model.layers_per_block=1", "train.batch_size=8"]


def test_global_draw_on_the_cpu_is_the_stream_checkpoints_resume_from():
    """(seed, step) -> one CPU generator drawing noise, then timesteps, then the dropout mask:
    the stream resumed runs and the 2-worker equivalence test rely on, with or without a device."""
    from pathloop.harness import global_draw

    cfg = load_config(PretrainConfig, None, [*TINY, "train.seed=3"])
    shape = (8, 3, 16, 16)
    g = torch.Generator().manual_seed(3 * 1_000_003 + 7)
    noise = torch.randn(shape, generator=g)  # (B, C, H, W)
    t = torch.randint(0, cfg.noise.num_train_timesteps, (8,), generator=g)  # (B,)
    drop = torch.rand(8, generator=g) < cfg.model.p_uncond  # (B,)
    for draw in (global_draw(cfg, 7, shape, 16), global_draw(cfg, 7, shape, 16, "cpu")):
        for got, want in zip(draw, (noise, t, drop), strict=True):
            assert torch.equal(got, want)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded batch of 8 images (B, C, H, W) in [-1, 1] and their class ids (B,)."""
    g = torch.Generator().manual_seed(0)
    return torch.rand((8, 3, 32, 32), generator=g) * 2 - 1, torch.randint(0, 16, (8,), generator=g)


def test_cpu_defaults_stay_eager_and_the_loss_stays_a_tensor():
    """compile=auto is off on the CPU and channels_last=auto on; a step returns its loss as a
    detached 0-d tensor (read only when reported), the same loss as with contiguous weights up
    to float rounding."""
    from pathloop.harness import build_state, global_draw, train_step

    cfg = load_config(PretrainConfig, None, TINY)
    assert cfg.train.compile == "auto" and cfg.train.channels_last == "auto"
    x0, ids = _batch()
    losses = {}
    for layout in ("auto", "false"):
        c = load_config(PretrainConfig, None, [*TINY, f"train.channels_last={layout}"])
        st = build_state(c, 16, torch.device("cpu"))
        assert st.model is st.raw and not st.autocast and not st.ema.foreach
        w = st.raw.conv_in.weight
        assert w.is_contiguous(memory_format=torch.channels_last) == (layout == "auto")
        steps = [train_step(st, x0, ids, *global_draw(c, s, x0.shape, 16), 1.0) for s in (0, 1)]
        loss = steps[-1]  # after one update: the optimizer step ran in this layout too
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
        assert torch.isfinite(loss)
        losses[layout] = float(loss)
    assert losses["auto"] == pytest.approx(losses["false"], rel=1e-4)
    for value in ("true", "false", "auto"):
        load_config(PretrainConfig, None, [f"train.compile={value}"])
    with pytest.raises(ConfigError, match="compile"):
        load_config(PretrainConfig, None, ["train.compile=sometimes"])


def test_bf16_cpu_autocasts_the_step_where_the_cpu_has_native_bf16(monkeypatch):
    """train.bf16_cpu: the step under bf16 autocast on a CPU with native bf16 instructions, its
    loss near fp32's; on one without them fp32 (train.bf16 alone is CUDA's)."""
    from pathloop.diffusion import cpu_bf16
    from pathloop.harness import build_state, global_draw, train_step

    x0, ids = _batch()
    losses = {}
    for flag in ("false", "true"):
        c = load_config(PretrainConfig, None, [*TINY, f"train.bf16_cpu={flag}"])
        st = build_state(c, 16, torch.device("cpu"))
        assert st.autocast == (flag == "true" and cpu_bf16(True, "cpu"))
        losses[flag] = float(train_step(st, x0, ids, *global_draw(c, 0, x0.shape, 16), 1.0))
    assert losses["true"] == pytest.approx(losses["false"], rel=0.05)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    c = load_config(PretrainConfig, None, [*TINY, "train.bf16_cpu=true"])
    assert not build_state(c, 16, torch.device("cpu")).autocast


def test_step_loop_reads_the_losses_once_per_report(monkeypatch, tmp_path):
    """Steps hand back tensors; each report holds its window's mean as a float, and the first
    report the first step's seconds (the step torch.compile compiles in)."""
    from pathloop import harness

    reports: list[dict] = []
    monkeypatch.setattr(harness, "report", lambda _cfg, _step, m, *_a: reports.append(m))
    cfg = load_config(
        PretrainConfig, None, [f"workdir={tmp_path}", "train.steps=4", "train.log_every=2"]
    )
    losses = iter(torch.tensor([1.0, 3.0, 5.0, 7.0]))
    harness.step_until_done(cfg, 0, lambda _s, _b: (next(losses), {}), log=None, save=None)
    windows = [m for m in reports if m]
    assert [m["loss"] for m in windows] == [2.0, 6.0]
    assert all(type(m["loss"]) is float for m in windows)
    assert windows[0]["first_step_s"] >= 0 and "first_step_s" not in windows[1]
    assert harness.describe({"first_step_s": 101.04}) == "first step 101.0 s"
