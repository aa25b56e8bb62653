"""``make bench``'s GPU section: pathloop's training step beside a diffusers-example step, and
``sample()``, timed in one process on the same model and batch, with the FLOP/s achieved, the
fraction of the device's peak, peak memory and compile time.

On CUDA it runs the paper preset (64 px, batch 256, DDIM-50 with CFG 2); on a CPU machine the
same code runs the tiny preset for a few steps (``tests/test_bench.py`` runs it so in seconds),
which checks the section, not the GPU path's speed.
"""

from __future__ import annotations

import copy
import gc
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pathloop.bench import Figure

# Dense bf16 tensor peak (TFLOP/s, no sparsity) by device name, first match wins; None elsewhere.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

NUM_CLASSES = 16  # the bone-marrow vocabulary's size


@dataclass(frozen=True)
class Setup:
    """What one run of the section measures."""

    preset: str  # model preset of the training steps
    batch: int  # images per training step
    warmup: int  # untimed steps (the first compiles), >= 1
    steps: int  # timed steps
    sample_presets: tuple[str, ...]  # presets sampled
    sample_n: int  # images per sampling measurement (one call)
    sample_steps: int  # DDIM steps
    compile: bool  # add the compiled variants (training and sampling)


def default_setup(cuda: bool) -> Setup:
    """The paper preset on CUDA; on CPU the tiny one, a few steps (a check that it runs)."""
    if cuda:
        return Setup("paper", 256, 3, 10, ("paper", "tiny"), 256, 50, compile=True)
    return Setup("tiny", 16, 2, 4, ("tiny",), 8, 4, compile=False)


def peak_tflops(device: Any) -> float | None:
    """The device's dense bf16 peak from ``PEAK_BF16_TFLOPS``; None on CPU or when unknown."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------- measuring


@dataclass
class Row:
    """One measured variant."""

    name: str
    images_per_s: float
    flops_per_image: float  # model FLOPs one image costs in this measurement
    first_s: float  # the first call (it compiles, when compiled)
    per_call_s: float  # a steady call
    peak_bytes: int | None  # CUDA peak allocated; None on CPU


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[int], Any], warmup: int, steps: int, device: Any) -> tuple[float, float]:
    """(seconds of the first call, seconds per steady call): the first call alone, warmup - 1
    more untimed, then ``steps`` timed; each phase ends by waiting for the device."""
    t0 = time.perf_counter()
    call(0)
    sync(device)
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        call(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        call(i)
    sync(device)
    return first, (time.perf_counter() - t0) / steps


def measured(
    name: str,
    make: Callable[[], Callable[[int], Any]],
    n: int,
    flops: float,
    warmup: int,
    steps: int,
    device: Any,
) -> Row:
    """``make()`` builds a variant's call (each variant its own model and optimizer), which is
    timed; peak memory counts from before it is built."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    first, per_call = timed(make(), warmup, steps, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Row(name, n / per_call, flops, first, per_call, peak)


def flops_per_image(unet: Any, x0: Any, class_ids: Any, backward: bool) -> float:
    """Model FLOPs per image of a forward (and backward) pass, by ``FlopCounterMode`` on two
    images (the count is linear in the batch). Attention is counted on CUDA only (CPU's fused
    attention kernel has no FLOP formula); at 64 px it is a small share."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x, ids = x0[:2], class_ids[:2]
    t = torch.full((len(x),), 500, device=x.device)
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(backward):
        out = unet(x, t, class_labels=ids).sample
        if backward:
            out.float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


# ----------------------------------------------------------------------------- training steps


def example_step(unet: Any, cfg: Any, x0: Any, class_ids: Any, bf16: bool):
    """diffusers' ``train_unconditional.py`` step, with class labels: noise drawn on the device,
    ``add_noise``, ``unet(...).sample``, ``F.mse_loss``, clip, AdamW, LR schedule, and the
    per-step ``loss.item()`` its progress bar logs."""
    import torch
    import torch.nn.functional as F

    from pathloop.diffusion import build_lr_schedule, build_scheduler

    scheduler = build_scheduler(cfg.noise, "ddpm")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    lr_sched = build_lr_schedule(opt, cfg.optim, cfg.train.steps)
    t_max, device = scheduler.config.num_train_timesteps, x0.device
    v_target = scheduler.config.prediction_type == "v_prediction"

    def step(_i: int) -> float:
        noise = torch.randn(x0.shape, device=device)  # (B, C, H, W)
        t = torch.randint(0, t_max, (len(x0),), device=device)  # (B,)
        noisy = scheduler.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = unet(noisy, t, class_labels=class_ids).sample
        target = scheduler.get_velocity(x0, noise, t) if v_target else noise
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.optim.grad_clip)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    return step


def pathloop_step(cfg: Any, x0: Any, class_ids: Any):
    """``pretrain_loop``'s step: ``build_state`` from ``cfg``, the global draw on the device,
    ``train_step`` (EMA included), the loss left on the device."""
    from pathloop.harness import build_state, global_draw, train_step

    st = build_state(cfg, NUM_CLASSES, x0.device)

    def step(i: int) -> Any:
        noise, t, drop = global_draw(cfg, i, tuple(x0.shape), NUM_CLASSES, x0.device)
        return train_step(st, x0, class_ids, noise, t, drop, cfg.optim.grad_clip)

    return step


def train_rows(s: Setup, device: Any) -> list[Row]:
    """The example (fp32; on CUDA also bf16) and pathloop's step (its defaults; on CUDA also
    with channels_last; with ``compile`` also compiled, with and without channels_last on CUDA),
    each from the same init on the same batch."""
    import torch

    from pathloop.config import updated
    from pathloop.diffusion import build_unet, resolve_model_config
    from pathloop.pretrain import PretrainConfig

    cfg = updated(PretrainConfig(), model={"preset": s.preset}, train={"batch_size": s.batch})
    px = resolve_model_config(cfg.model)["sample_size"]
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand((s.batch, 3, px, px), generator=g) * 2 - 1).to(device)  # (B, C, H, W)
    ids = torch.randint(0, NUM_CLASSES, (s.batch,), generator=g).to(device)  # (B,)

    def unet() -> Any:
        torch.manual_seed(cfg.train.seed)  # build_state's init
        return build_unet(cfg.model, NUM_CLASSES).to(device).train()

    def ours(**train: Any) -> Callable[[], Any]:
        return lambda: pathloop_step(updated(cfg, train=train), x0, ids)

    cuda = device.type == "cuda"
    variants = {"diffusers example, fp32": lambda: example_step(unet(), cfg, x0, ids, False)}
    if cuda:
        variants["diffusers example, bf16 autocast"] = lambda: example_step(
            unet(), cfg, x0, ids, True
        )
    variants["pathloop train_step, defaults, eager"] = ours(compile=False)
    if cuda:
        variants["pathloop train_step, channels_last, eager"] = ours(
            compile=False, channels_last=True
        )
    if s.compile:
        variants["pathloop train_step, compiled"] = ours(compile=True)
    if s.compile and cuda:
        variants["pathloop train_step, channels_last, compiled"] = ours(
            compile=True, channels_last=True
        )
    flops = flops_per_image(unet(), x0, ids, backward=True)
    name = f"train step, {s.preset} preset, batch {s.batch}"
    return [
        measured(f"{name}: {v}", make, s.batch, flops, s.warmup, s.steps, device)
        for v, make in variants.items()
    ]


# ----------------------------------------------------------------------------- sampling


def sample_rows(s: Setup, preset: str, device: Any) -> list[Row]:
    """``sample()`` of ``sample_n`` images in one call, DDIM with CFG 2: fp32 and, on CUDA, bf16,
    bf16 + channels_last and (``compile``) bf16 compiled; a fresh copy of one model each."""
    import torch

    from pathloop.config import ModelConfig, NoiseConfig
    from pathloop.diffusion import build_unet, sample

    torch.manual_seed(0)
    base = build_unet(ModelConfig(preset=preset), NUM_CLASSES).to(device).eval()
    ids, px = [i % NUM_CLASSES for i in range(s.sample_n)], base.config.sample_size
    x, two = torch.zeros((2, 3, px, px), device=device), torch.arange(2, device=device)
    flops = 2 * s.sample_steps * flops_per_image(base, x, two, backward=False)  # CFG: 2 passes
    base.cpu()  # each variant moves its own copy to the device
    cuda, bf16 = device.type == "cuda", torch.bfloat16
    variants: list[tuple[str, dict]] = [("fp32", {})]
    if cuda:
        variants += [
            ("bf16", {"dtype": bf16}),
            ("bf16, channels_last", {"dtype": bf16, "channels_last": True}),
        ]
    if s.compile:
        variants.append(
            ("bf16, compiled" if cuda else "compiled", {"dtype": bf16, "compile": True})
        )

    def make(kw: dict) -> Callable[[int], Any]:
        unet = copy.deepcopy(base)
        return lambda i: sample(
            unet,
            NoiseConfig(),
            ids,
            sampler="ddim",
            steps=s.sample_steps,
            guidance=2.0,
            seed=i,
            batch_size=s.sample_n,
            device=device,
            **kw,
        )

    name = f"sample(), {preset} preset, {s.sample_n} images, ddim-{s.sample_steps}, CFG 2"
    return [
        measured(f"{name}: {v}", lambda kw=kw: make(kw), s.sample_n, flops, 1, 1, device)
        for v, kw in variants
    ]


# ----------------------------------------------------------------------------- figures


def bench_gpu(setup: Setup | None = None) -> list[Figure]:
    """The section's figures: each pathloop step against the example at its precision, each
    sampling variant against fp32; notes hold FLOP/s, the fraction of peak, memory, compile."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = setup or default_setup(device.type == "cuda")
    peak = peak_tflops(device)
    rows = train_rows(s, device)
    peer = rows[1] if device.type == "cuda" else rows[0]  # the example at pathloop's precision
    figs = [figure(r, peer if "pathloop" in r.name else None, peak) for r in rows]
    for preset in s.sample_presets:
        rows = sample_rows(s, preset, device)
        figs += [figure(r, rows[0] if r is not rows[0] else None, peak) for r in rows]
    if device.type == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
        figs[0].note += f"; CPU: no peak FLOP/s or device memory (process max RSS {rss:.2f} GiB)"
    return figs


def figure(r: Row, peer: Row | None, peak: float | None) -> Figure:
    """A row as a ``Figure`` (images/s against ``peer``) with its FLOP/s and memory noted."""
    tflops = r.images_per_s * r.flops_per_image / 1e12
    parts = [
        f"{r.flops_per_image / 1e9:.4g} GFLOP/image, {tflops:.3g} TFLOP/s"
        + (f" = {tflops / peak:.1%} of the dense bf16 peak ({peak:.0f})" if peak else ""),
        f"first call {r.first_s:.2f} s against {r.per_call_s:.3f} s steady"
        + (f" (compile ~{r.first_s - r.per_call_s:.0f} s)" if "compiled" in r.name else ""),
    ]
    if r.peak_bytes is not None:
        parts.append(f"peak memory {r.peak_bytes / 2**30:.1f} GiB")
    return Figure(
        f"GPU section: {r.name}",
        r.images_per_s,
        "images/s",
        peer.name if peer else None,
        peer.images_per_s if peer else None,
        ">= 1.0x" if r.name.endswith("pathloop train_step, defaults, eager") else None,
        note="; ".join(parts),
    )
