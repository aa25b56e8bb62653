"""diffusion.py: tiny UNets (16 px), 2-10 sampling steps, seeded; the whole file runs in seconds."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pathloop import diffusion as D
from pathloop.config import ModelConfig, NoiseConfig, OptimConfig
from pathloop.losses import diffusion_loss
from pathloop.vocab import Vocabulary

NUM_CLASSES = 3
NOISE = NoiseConfig()
TINY = ModelConfig(sample_size=16, block_out_channels=(16, 32), layers_per_block=1)


def _unet(seed: int = 0):
    torch.manual_seed(seed)
    return D.build_unet(TINY, NUM_CLASSES)


def _discs(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1]: a disc of class colour (R, G or B) on a dark background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.full((n, 3, size, size), -0.8)
    for i in range(n):
        cy, cx = (torch.rand(2, generator=g) * size * 0.4 + size * 0.3).tolist()
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.3) ** 2  # (H, W)
        out[i, i % 3][mask] = 0.8
    return out


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, list[float]]:
    """A tiny UNet after 30 AdamW steps on discs; the fixed-noise loss before and after."""
    unet, sched = _unet(), D.build_scheduler(NOISE)
    x0 = _discs(12)
    ids = torch.arange(12) % NUM_CLASSES
    g = torch.Generator().manual_seed(1)
    fixed = dict(noise=torch.randn(x0.shape, generator=g), timesteps=torch.arange(12) * 80 + 20)

    def eval_loss() -> float:
        with torch.no_grad():
            return diffusion_loss(unet, sched, x0, ids, **fixed).mean().item()

    before = eval_loss()
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    for _ in range(30):
        loss = diffusion_loss(unet, sched, x0, ids, p_uncond=0.2, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval(), [before, eval_loss()]


# ----------------------------------------------------------------------------- model, schedulers


def test_build_unet_presets_and_null_class():
    unet = D.build_unet(ModelConfig(preset="tiny"), 16)
    n_params = sum(p.numel() for p in unet.parameters())
    assert 0.5e6 < n_params < 2e6
    assert unet.config.sample_size == 32
    assert D.null_class(unet) == 16 and unet.config.num_class_embeds == 17
    assert D.resolve_model_config(ModelConfig(preset="paper"))["sample_size"] == 64
    assert D.resolve_model_config(TINY)["block_out_channels"] == (16, 32)
    with pytest.raises(ValueError, match="num_classes"):
        D.build_unet(ModelConfig(num_classes=4), 3)


def test_build_scheduler_shares_the_schedule():
    scheds = [D.build_scheduler(NOISE, s) for s in D.SAMPLERS]
    names = [type(s).__name__ for s in scheds]
    assert names == ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"]
    assert scheds[2].config.algorithm_type == "dpmsolver++"
    for s in scheds[1:]:
        assert torch.equal(s.betas, scheds[0].betas)
        assert s.config.prediction_type == NOISE.prediction_type
    with pytest.raises(ValueError, match="valid samplers"):
        D.build_scheduler(NOISE, "euler")


def test_loss_falls_in_30_steps(trained):
    _, (before, after) = trained
    assert after < 0.7 * before, (before, after)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_each_sampler_runs(trained, sampler):
    unet, _ = trained
    x = D.sample(unet, NOISE, [0, 1, 2], sampler=sampler, steps=2, seed=3)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.abs().max() <= 1
    img = D.to_uint8(x)
    assert img.shape == (3, 16, 16, 3) and img.dtype == np.uint8


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_deterministic_and_independent_of_batching(sampler):
    unet = _unet()
    kw = dict(sampler=sampler, steps=3, guidance=2.0)
    a = D.sample(unet, NOISE, [0, 1, 2, 0], seed=7, batch_size=4, **kw)
    assert torch.equal(a, D.sample(unet, NOISE, [0, 1, 2, 0], seed=7, batch_size=4, **kw))
    # Other batch size: same images up to float rounding of batched convolutions.
    b = D.sample(unet, NOISE, [0, 1, 2, 0], seed=7, batch_size=3, **kw)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # Image i depends only on (seed + i, class): a request starting at seed 8 reproduces a[1:3],
    # whatever it is batched with.
    c = D.sample(unet, NOISE, [1, 2, 1, 0, 2], seed=8, batch_size=5, **kw)
    torch.testing.assert_close(a[1:3], c[:2], atol=1e-4, rtol=0)
    assert not torch.allclose(a[0], a[3])  # same class, different seed


def test_channels_last_sampling_draws_the_same_images():
    """SamplerConfig's fields are sample()'s keywords; channels_last weights (converted in
    place; the default, auto, on a CPU) change no image beyond float rounding."""
    import copy

    from pathloop.config import SamplerConfig, updated

    unet = _unet()
    cfg = SamplerConfig(sampler="ddim", steps=2, guidance=2.0, seed=3, batch_size=3)
    assert cfg.channels_last == "auto" and D.use_channels_last("auto", "cpu")
    assert not D.use_channels_last("auto", "cuda") and D.use_channels_last(True, "cuda")
    a = D.sample(unet, NOISE, [0, 1, 2], **updated(cfg, channels_last=False).model_dump())
    assert unet.conv_in.weight.is_contiguous()
    for setting in ("auto", True):
        other = copy.deepcopy(unet)
        b = D.sample(other, NOISE, [0, 1, 2], **updated(cfg, channels_last=setting).model_dump())
        assert other.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert not other.conv_in.weight.is_contiguous()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_bf16_cpu_sampling_stays_close_to_fp32(monkeypatch):
    """bf16_cpu runs the UNet under bf16 autocast on a CPU with native bf16 instructions: the
    same noise, images apart by bf16 rounding only; on a CPU without them, or off, fp32."""
    from pathloop.config import SamplerConfig

    unet = _unet()
    cfg = SamplerConfig(sampler="dpm++", steps=4, guidance=2.0, seed=3, batch_size=3)
    assert cfg.bf16_cpu is False and not D.cpu_bf16(False, "cpu") and not D.cpu_bf16(True, "cuda")
    fp32 = D.sample(unet, NOISE, [0, 1, 2], **cfg.model_dump())
    on = cfg.model_copy(update={"bf16_cpu": True}).model_dump()
    if D.cpu_bf16(True, "cpu"):
        calls = []
        real = torch.autocast
        monkeypatch.setattr(torch, "autocast", lambda *a, **k: calls.append(a) or real(*a, **k))
        bf16 = D.sample(unet, NOISE, [0, 1, 2], **on)
        monkeypatch.undo()
        assert calls and all(a == ("cpu", torch.bfloat16) for a in calls)
        diff = (bf16 - fp32).abs()
        assert bf16.dtype == torch.float32 and 0 < diff.mean() < 0.05, diff.mean()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not D.cpu_bf16(True, "cpu")
    assert torch.equal(D.sample(unet, NOISE, [0, 1, 2], **on), fp32)  # no native bf16: fp32


def test_cfg_null_class_and_guidance():
    unet = _unet()
    null = D.null_class(unet)
    assert null == NUM_CLASSES
    kw = dict(steps=2, seed=5)
    uncond = D.sample(unet, NOISE, [0, 1], guidance=0.0, **kw)
    assert torch.equal(uncond, D.sample(unet, NOISE, [null, null], guidance=1.0, **kw))
    cond = D.sample(unet, NOISE, [0, 1], guidance=1.0, **kw)
    cfg = D.sample(unet, NOISE, [0, 1], guidance=3.0, **kw)
    assert not torch.allclose(cond, uncond) and not torch.allclose(cfg, cond)
    with pytest.raises(ValueError, match="null class"):
        D.sample(unet, NOISE, [null + 1], **kw)


def test_image_to_image_strength(trained):
    unet, _ = trained
    init = _discs(3, seed=4)
    ids = [1, 2, 0]  # ask for another class than the init image's
    kw = dict(sampler="ddim", steps=10, seed=2, guidance=1.0)
    weak = D.sample(unet, NOISE, ids, init_images=init, strength=0.1, **kw)
    full = D.sample(unet, NOISE, ids, init_images=init, strength=1.0, **kw)
    from_noise = D.sample(unet, NOISE, ids, **kw)
    assert (weak - init).pow(2).mean() < 0.25 * (full - init).pow(2).mean()
    # At strength 1 the init image survives only as sqrt(alphabar_{T-1}) ~ 1e-4 of x_T.
    torch.testing.assert_close(full, from_noise, atol=2e-2, rtol=0)


def _colour_log_prob(x: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """Toy classifier: class c prefers colour channel c; log p(c | x), (B,)."""
    logits = 20 * x.mean(dim=(2, 3))  # (B, 3)
    return torch.log_softmax(logits, dim=1).gather(1, class_ids.view(-1, 1))[:, 0]


def test_classifier_guidance_moves_toward_class(trained):
    unet, _ = trained
    ids = torch.tensor([0, 1, 2, 1])
    guidance_fn = D.classifier_guidance(lambda x, t, c: _colour_log_prob(x, c))
    kw = dict(sampler="ddim", steps=2, seed=0, guidance=1.0, guidance_fn=guidance_fn)
    scores = [
        _colour_log_prob(D.sample(unet, NOISE, ids, guidance_scale=s, **kw), ids).mean().item()
        for s in (0.0, 1.0, 3.0)
    ]
    # log p(c|x) <= 0: with v-prediction scale 1 already saturates it (~ -3e-8) on this toy task
    assert scores[0] < scores[1] <= scores[2] + 1e-6 and scores[2] > scores[0] + 0.1, scores


def test_guidance_shift_is_the_same_for_v_prediction():
    g = torch.Generator().manual_seed(0)
    x_t, eps, d_eps = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    ab = torch.tensor(0.3)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def x0_from_v(v_: torch.Tensor) -> torch.Tensor:
        return ab.sqrt() * x_t - (1 - ab).sqrt() * v_

    x0_eps = (x_t - (1 - ab).sqrt() * (eps + d_eps)) / ab.sqrt()
    x0_v = x0_from_v(D._shift_for_guidance(v, d_eps, ab, "v_prediction"))
    torch.testing.assert_close(x0_eps, x0_v)


# ----------------------------------------------------------------------------- EMA, checkpoints


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_round_trip(tmp_path: Path):
    unet = _unet()
    ema = D.build_ema(unet, OptimConfig(ema_decay=0.99))
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    sched, x0, ids = D.build_scheduler(NOISE), _discs(4), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        opt.zero_grad()
        diffusion_loss(unet, sched, x0, ids).mean().backward()
        opt.step()
        ema.step(unet.parameters())
    vocab = Vocabulary.from_names(["a", "b", "c"])
    config = {"noise": NOISE.model_dump(), "model": TINY.model_dump(mode="json"), "seed": 1}
    kw = dict(ema_unet=ema, optimizer=opt, config=config, vocab=vocab, extra={"epoch": 1})
    D.save_checkpoint(tmp_path / "ck", unet, step=3, **kw)
    for name in ("unet", "ema", "optimizer.pt", "state.json", "config.json", "classes.json"):
        assert (tmp_path / "ck" / name).exists()

    ck = D.load_checkpoint(tmp_path / "ck", optimizer=True)  # resuming reads the optimizer
    assert _state_equal(ck.raw_unet, unet)
    ema_unet = D.ema_copy(unet, ema)
    assert _state_equal(ck.unet, ema_unet) and not _state_equal(ck.unet, unet)
    assert ck.ema.optimization_step == ema.optimization_step == 3
    assert ck.ema.decay == 0.99 and ck.ema.use_ema_warmup
    assert ck.step == 3 and ck.extra == {"epoch": 1} and ck.config == config
    assert ck.vocab == vocab and ck.noise == NOISE
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(ck.optimizer_state["state"][0][k]), torch.as_tensor(v))
    assert ck.optimizer_state["param_groups"] == opt.state_dict()["param_groups"]
    opt.load_state_dict(ck.optimizer_state)  # resumable

    kw = dict(steps=2, seed=1)
    loaded, original = (
        D.sample(ck.unet, ck.noise, [0, 2], **kw),
        D.sample(ema_unet, NOISE, [0, 2], **kw),
    )
    assert torch.equal(loaded, original)
    assert _state_equal(D.load_checkpoint(tmp_path / "ck", ema=False).unet, unet)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule_warms_up_then_holds_or_decays(schedule):
    from pathloop.config import OptimConfig
    from pathloop.diffusion import build_lr_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_schedule(opt, OptimConfig(lr=1.0, warmup_steps=10, schedule=schedule), 100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[10] == pytest.approx(1.0)  # linear warm-up
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[50] < 0.95 and lrs[-1] < 0.05  # decays to 0 at train.steps
