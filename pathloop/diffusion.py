"""The diffusion model: build_unet, build_scheduler, the ONE sample() loop, EMA and checkpoints.

The UNet is a diffusers ``UNet2DModel`` with a class embedding of ``num_classes + 1`` rows; the last
row is the *null class* used for classifier-free guidance (trained by class dropout, see
``losses.diffusion_loss``). Schedules are diffusers schedulers built from one ``NoiseConfig``.

``sample()`` holds the only denoising loop in pathloop. Training previews, sampling jobs,
classifier(-free) guidance, autoguidance, guidance in a limited interval, image-to-image (SDEdit,
MAGIC's mode) and HTTP serving all call it.
Image i of a request draws all of its noise from its own generator seeded ``seed + i``, so an image
does not depend on the batch size or on the other images it was batched with.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pathloop.config import ModelConfig, NoiseConfig, OptimConfig
from pathloop.vocab import Vocabulary

if TYPE_CHECKING:  # diffusers is imported inside the functions that need it
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpm++")

# (x_t, t, class_ids) -> grad_x log p(c | x_t), same shape as x_t. See ``sample(guidance_fn=...)``.
GuidanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# ----------------------------------------------------------------------------- model

# Presets; ModelConfig fields left None take these values.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: trains in minutes on a laptop, ~1.1M params.
    "tiny": dict(
        sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1, attention=False
    ),
    # ~4.8M params, self-attention at the 8x8 level and in the mid block.
    "small": dict(
        sample_size=32, block_out_channels=(64, 128, 128), layers_per_block=1, attention=True
    ),
    # GPU-sized, ADM-like at 64 px (~76M params), attention at the 8x8 level and in the mid block.
    "paper": dict(
        sample_size=64, block_out_channels=(128, 256, 256, 512), layers_per_block=2, attention=True
    ),
}


def _norm_groups(channels: Sequence[int]) -> int:
    """GroupNorm groups: ~4+ channels per group, at most 32, dividing every level's width."""
    groups = max(1, min(32, channels[0] // 4))
    while any(c % groups for c in channels):
        groups -= 1
    return groups


def resolve_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """The preset's values overridden by the fields of ``cfg`` that are not None."""
    resolved = dict(PRESETS[cfg.preset])
    for key in resolved:
        value = getattr(cfg, key)
        if value is not None:
            resolved[key] = tuple(value) if key == "block_out_channels" else value
    return resolved


def build_unet(cfg: ModelConfig, num_classes: int) -> UNet2DModel:
    """A class-conditional RGB ``UNet2DModel``; class id ``num_classes`` is the null class."""
    from diffusers import UNet2DModel

    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(
            f"model.num_classes={cfg.num_classes} but the data has {num_classes} classes; "
            "leave model.num_classes unset to take it from the data"
        )
    r = resolve_model_config(cfg)
    ch, attn = r["block_out_channels"], r["attention"]
    levels = len(ch)
    # Attention only at the lowest resolution (cheap there), as in DDPM/ADM at small sizes.
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D" if attn else "DownBlock2D",)
    up = ("AttnUpBlock2D" if attn else "UpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    return UNet2DModel(
        sample_size=r["sample_size"],
        in_channels=3,
        out_channels=3,
        block_out_channels=ch,
        layers_per_block=r["layers_per_block"],
        down_block_types=down,
        up_block_types=up,
        add_attention=attn,  # mid-block attention
        attention_head_dim=min(32, ch[-1]),
        norm_num_groups=_norm_groups(ch),
        resnet_time_scale_shift="scale_shift",  # AdaGN (Dhariwal & Nichol): stronger conditioning
        num_class_embeds=num_classes + 1,  # + the null class
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def null_class(unet: torch.nn.Module) -> int:
    """The class id that means "no class" (the last row of the class embedding)."""
    return int(unwrap(unet).config.num_class_embeds) - 1


# ----------------------------------------------------------------------------- schedulers


def build_scheduler(noise: NoiseConfig, sampler: str = "ddpm"):
    """A diffusers scheduler for ``noise``: ddpm (training and ancestral sampling), ddim, dpm++.

    All share the betas, prediction type and T. "trailing" timestep spacing makes few-step
    sampling start at t = T-1 (pure noise) rather than skipping the noisiest part of the schedule.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(
        num_train_timesteps=noise.num_train_timesteps,
        beta_schedule=noise.beta_schedule,
        prediction_type=noise.prediction_type,
        timestep_spacing="trailing",
    )
    if sampler == "ddpm":
        return DDPMScheduler(**common)
    if sampler == "ddim":
        return DDIMScheduler(**common)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")


# ----------------------------------------------------------------------------- sampling


def _as_class_tensor(class_ids: Sequence[int] | torch.Tensor, null_id: int) -> torch.Tensor:
    ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1).cpu()  # (N,)
    bad = ids[(ids < 0) | (ids > null_id)]
    if len(bad):
        raise ValueError(
            f"class ids must be in 0..{null_id} ({null_id} = null class), got {bad.tolist()}"
        )
    return ids


def _initial_noise(
    n: int, shape: tuple[int, ...], seed: int, per_image: bool, seeds: Sequence[int] | None
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(N, C, H, W) noise and the generators that keep drawing each image's step noise (CPU)."""
    if per_image:
        own = list(seeds) if seeds is not None else [seed + i for i in range(n)]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in own]
        noise = torch.cat([torch.randn((1, *shape), generator=g) for g in gens])  # (N, C, H, W)
        return noise, gens
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((n, *shape), generator=gen), [gen]


def _shift_for_guidance(
    out: torch.Tensor, d_eps: torch.Tensor, alphabar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Apply an eps shift ``d_eps`` (at fixed x_t) to a model output of ``prediction_type``.

    eps-prediction: out + d_eps. v-prediction: v = sqrt(ab) eps - sqrt(1-ab) x0 with
    x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab), so a shift d_eps moves v by d_eps / sqrt(ab).
    """
    if prediction_type == "epsilon":
        return out + d_eps
    if prediction_type == "v_prediction":
        return out + d_eps / alphabar.sqrt()
    raise ValueError(f"classifier guidance does not support prediction_type={prediction_type!r}")


def _predict(
    unet: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    null_id: int,
    guidance: float,
    autocast: Callable[[], contextlib.AbstractContextManager],
    guide: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Guided model output. Classifier-free: null + g * (cond - null), one batched call.
    With a ``guide``: guide(cond) + g * (model(cond) - guide(cond)) (autoguidance, Karras et al.
    2024), one call per model. g = 1 is the conditional model alone either way."""
    if guide is not None and guidance != 1.0:
        with autocast():
            out = unet(x, t, class_labels=cond).sample.float()  # (B, C, H, W)
            out_guide = guide(x, t, class_labels=cond).sample.float()  # (B, C, H, W)
        return out_guide + guidance * (out - out_guide)
    if guidance == 1.0:
        labels, x_in = cond, x  # conditional only
    elif guidance == 0.0:
        labels, x_in = torch.full_like(cond, null_id), x  # unconditional only
    else:
        labels = torch.cat([cond, torch.full_like(cond, null_id)])  # (2B,)
        x_in = torch.cat([x, x])  # (2B, C, H, W)
    with autocast():
        out = unet(x_in, t, class_labels=labels).sample.float()
    if guidance in (0.0, 1.0):
        return out
    out_cond, out_null = out.chunk(2)  # (B, C, H, W) each
    return out_null + guidance * (out_cond - out_null)


@dataclass(frozen=True)
class _LoopSettings:
    """What one ``sample()`` request fixes for all of its chunks."""

    noise: NoiseConfig
    sampler: str
    steps: int
    guidance: float
    guidance_interval: tuple[float, float]
    guide: torch.nn.Module | None
    strength: float
    guidance_fn: GuidanceFn | None
    guidance_scale: float
    autocast: Callable[[], contextlib.AbstractContextManager]
    on_step: Callable[[], None]


def _denoise_chunk(
    unet: torch.nn.Module,
    s: _LoopSettings,
    x_noise: torch.Tensor,
    cond: torch.Tensor,
    gens: list[torch.Generator],
    init: torch.Tensor | None,
) -> torch.Tensor:
    """THE denoising loop: (B, C, H, W) noise (+ optional init images) -> (B, C, H, W) samples."""
    scheduler = build_scheduler(s.noise, s.sampler)  # fresh: multistep schedulers keep state
    scheduler.set_timesteps(s.steps, device=x_noise.device)
    timesteps = scheduler.timesteps
    null_id = null_class(unet)
    gen = gens if len(gens) > 1 else gens[0]
    # DDIM: re-derive eps from the clipped x0 so its two terms agree (matters under guidance).
    step_kwargs = {"use_clipped_model_output": True} if s.sampler == "ddim" else {}

    # --- start: pure noise, or SDEdit (noise the init images to the first kept timestep)
    if init is None:
        x = x_noise * scheduler.init_noise_sigma
    else:
        keep = int(s.steps * s.strength)
        if keep == 0:
            return init.clone()  # nothing to denoise at this strength
        start = len(timesteps) - keep
        timesteps = timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):  # multistep solvers index sigmas from here
            scheduler.set_begin_index(start * scheduler.order)
        x = scheduler.add_noise(init, x_noise, timesteps[:1])

    # --- loop
    lo, hi = s.guidance_interval
    for t in timesteps:
        x_in = scheduler.scale_model_input(x, t)
        # Guidance only inside the interval, scale 1 (conditional) outside (Kynkaanniemi 2024)
        g = s.guidance if lo <= int(t) / s.noise.num_train_timesteps <= hi else 1.0
        out = _predict(unet, x_in, t, cond, null_id, g, s.autocast, s.guide)  # (B, C, H, W)
        if s.guidance_fn is not None and s.guidance_scale != 0.0:
            # Classifier guidance (Dhariwal & Nichol 2021, Alg. 2): eps - sqrt(1-ab) * s * grad.
            alphabar = scheduler.alphas_cumprod[int(t)].to(x.device)
            with torch.enable_grad():
                grad = s.guidance_fn(x.detach(), t, cond).detach().float()  # (B, C, H, W)
            d_eps = -(1 - alphabar).sqrt() * s.guidance_scale * grad
            out = _shift_for_guidance(out, d_eps, alphabar, s.noise.prediction_type)
        x = scheduler.step(out, t, x, generator=gen, **step_kwargs).prev_sample
        s.on_step()
    return x


def use_channels_last(setting: bool | str, device: torch.device | str) -> bool:
    """``channels_last: auto`` resolved for ``device``: on for CPUs, where the tiny preset's
    convolutions and GroupNorm run faster in that layout (2-core CPU machine, 2026-12-06: training
    1.3x, DPM++ sampling 1.37x as many images/s), off for GPUs, where eager GroupNorm has no
    channels_last kernel and every norm converts the activations back and forth."""
    if setting == "auto":
        return torch.device(device).type == "cpu"
    return bool(setting)


def cpu_bf16(requested: bool, device: torch.device | str) -> bool:
    """Whether bf16 autocast runs on ``device`` when a CPU run asks for it (``bf16_cpu``): only
    on a CPU whose oneDNN has native bf16 instructions (AVX512-BF16 or AMX), where the tiny
    preset trains about 1.5x and samples about 1.5x as many images/s as in fp32 (2-core EPYC,
    one thread, 2026-12-07). Elsewhere bf16 is emulated and slower, so the run stays in fp32."""
    if not requested or torch.device(device).type != "cpu":
        return False
    mkldnn = torch.backends.mkldnn.is_available()
    return bool(mkldnn and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _prepare_denoiser(unet: torch.nn.Module, channels_last: bool, compile_: bool) -> None:
    """channels_last weights and ``nn.Module.compile`` of ``unet``, in place (a module compiled
    before is kept as it is). Compiled with static shapes: the first chunk of each shape compiles
    (CFG doubles the rows; a last, smaller chunk is a new shape), later ones reuse the graph, so
    it pays when one model samples many batches of one size (a sampling actor, Serve)."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_ and unwrap(unet) is unet and unet._compiled_call_impl is None:
        unet.compile(dynamic=False)  # once; a torch.compile or DDP wrapper is left as it is


def check_guide(unet: torch.nn.Module, guide: torch.nn.Module) -> None:
    """ValueError unless ``guide`` takes ``unet``'s inputs: the same image shape and class ids."""
    a, b = unwrap(unet).config, unwrap(guide).config
    keys = ("sample_size", "in_channels", "out_channels", "num_class_embeds")
    diff = {k: (a[k], b[k]) for k in keys if a[k] != b[k]}
    if diff:
        raise ValueError(f"the guide does not match the model (model, guide): {diff}")


def _load_guide(
    guide: torch.nn.Module | str | Path | None, weights: str, device: torch.device
) -> torch.nn.Module | None:
    """``guide`` as a module: a checkpoint directory is loaded with its ``weights`` (ema|raw)."""
    if guide is None or isinstance(guide, torch.nn.Module):
        return guide
    return load_checkpoint(guide, ema=weights == "ema", map_location=device).unet


def sigma_interval(noise: NoiseConfig, sigma_lo: float, sigma_hi: float) -> tuple[float, float]:
    """The ``guidance_interval`` [lo, hi] (noise level t/T) of the timesteps whose EDM noise
    level sigma_t = sqrt((1 - ab_t) / ab_t) lies in [sigma_lo, sigma_hi], under ``noise``'s
    schedule (the unit Kynkaanniemi et al. 2024 give intervals in)."""
    alphabar = build_scheduler(noise).alphas_cumprod.double()  # (T,)
    sigma = ((1 - alphabar) / alphabar).sqrt()  # (T,), increasing in t
    inside = ((sigma >= sigma_lo) & (sigma <= sigma_hi)).nonzero().flatten()
    if not len(inside):
        raise ValueError(f"no timestep has sigma in [{sigma_lo}, {sigma_hi}]")
    t_max = noise.num_train_timesteps
    return int(inside[0]) / t_max, int(inside[-1]) / t_max


def _progress(enabled: bool, total: int):
    """A rich progress bar (or nothing) and a callback that advances it by one step."""
    if not enabled:
        return nullcontext(), lambda: None
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task("sampling", total=total)
    return bar, lambda: bar.advance(task)


def sample(
    unet: torch.nn.Module,
    noise: NoiseConfig,
    class_ids: Sequence[int] | torch.Tensor,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 2.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
    guide: torch.nn.Module | str | Path | None = None,
    weights: str = "ema",
    guide_weights: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    init_images: torch.Tensor | None = None,
    strength: float = 1.0,
    guidance_fn: GuidanceFn | None = None,
    guidance_scale: float = 0.0,
    progress: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    generator_per_image: bool = True,
    seeds: Sequence[int] | None = None,
    channels_last: bool | str = False,
    compile: bool = False,
    bf16_cpu: bool = False,
) -> torch.Tensor:
    """Draw one image per class id; returns (N, C, H, W) float32 in [-1, 1] on the CPU.

    sampler/steps: diffusers scheduler and number of denoising steps.
    guidance: classifier-free guidance scale g, eps = eps_null + g (eps_cond - eps_null);
        1 = conditional only, 0 = unconditional (the null class). A class id may itself be the
        null id (``null_class(unet)``).
    guidance_interval: [lo, hi] of the noise level t/T (t the scheduler's timestep, T the
        schedule's length) at which ``guidance`` applies; other steps run at scale 1
        (Kynkaanniemi et al. 2024). (0, 1) = every step. Classifier guidance is not limited.
    guide: autoguidance (Karras et al. 2024): a weaker model of the same classes and image size
        (a module, or a checkpoint directory loaded with ``guide_weights``, default ``weights``)
        replaces the null class: eps = eps_guide + g (eps_model - eps_guide), both conditional.
    weights: the weights of a guide loaded here; ``unet``'s are the caller's choice
        (``load_checkpoint(ema=...)``).
    seed: image i draws its initial and per-step noise from a generator seeded ``seed + i``, so it
        is the same whatever the batch size or the other images in the request. With
        ``generator_per_image=False`` one generator seeded ``seed`` serves the whole request
        (results then depend on N and batch_size).
    seeds: explicit per-image seeds (overrides ``seed + i``), e.g. for jobs that split one
        request across workers: image j of the whole job keeps seed ``base + j`` wherever it runs.
    init_images/strength: image-to-image (SDEdit, MAGIC): (N, C, H, W) in [-1, 1]; only the last
        ``int(steps * strength)`` timesteps run, starting from the init images noised to the first.
    guidance_fn/guidance_scale: classifier guidance; ``guidance_fn(x_t, t, class_ids)`` returns
        grad_x log p(c | x_t) (see ``classifier_guidance``); eps -= sqrt(1 - ab_t) * scale * grad.
    device: where to run; None = the unet's device, else the unet is moved there.
    dtype: torch.bfloat16 turns on bf16 autocast on CUDA (ignored on CPU).
    bf16_cpu: bf16 autocast on a CPU with native bf16 instructions (``cpu_bf16``); the images
        then differ from fp32's by bf16 rounding (same noise, same seeds).
    channels_last/compile: convert the unet in place, as ``device`` moves it (see
        ``_prepare_denoiser``); both off by default (``channels_last="auto"``: on for a CPU,
        see ``use_channels_last``), and neither changes which noise an image draws, so either
        reproduces the default sampler up to float rounding.
    ``SamplerConfig`` fields are keyword arguments: ``sample(u, n, ids, **cfg.model_dump())``
    (the jobs resolve a guide reference such as a result.json or 'earliest' first).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    lo, hi = (float(v) for v in guidance_interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must be [lo, hi] in [0, 1], got {[lo, hi]}")
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    unet.to(device)
    channels_last = use_channels_last(channels_last, device)
    _prepare_denoiser(unet, channels_last, compile)
    guide = _load_guide(guide, guide_weights or weights, device)
    if guide is not None:
        check_guide(unet, guide)
        guide.to(device)
        _prepare_denoiser(guide, channels_last, compile)
    ids = _as_class_tensor(class_ids, null_class(unet))  # (N,)
    n, cfg = len(ids), unwrap(unet).config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if n == 0:
        return torch.empty((0, *shape))
    if init_images is not None and tuple(init_images.shape) != (n, *shape):
        raise ValueError(f"init_images must be {(n, *shape)}, got {tuple(init_images.shape)}")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"seeds must have one entry per class id ({n}), got {len(seeds)}")
    x_noise, gens = _initial_noise(n, shape, seed, generator_per_image, seeds)  # (N, C, H, W)
    bf16 = device.type == "cuda" and dtype == torch.bfloat16 or cpu_bf16(bf16_cpu, device)
    bar, on_step = _progress(progress, math.ceil(n / batch_size) * steps)
    settings = _LoopSettings(
        noise=noise,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        guidance_interval=(lo, hi),
        guide=guide,
        strength=strength,
        guidance_fn=guidance_fn,
        guidance_scale=guidance_scale,
        autocast=(lambda: torch.autocast(device.type, torch.bfloat16)) if bf16 else nullcontext,
        on_step=on_step,
    )
    modes = [(m, m.training) for m in (unet, guide) if m is not None]
    chunks = []
    for m, _ in modes:
        m.eval()
    try:
        with bar, torch.no_grad():
            for lo in range(0, n, batch_size):
                hi = min(lo + batch_size, n)
                init = None if init_images is None else init_images[lo:hi].to(device).float()
                x_noise_b, ids_b = x_noise[lo:hi].to(device), ids[lo:hi].to(device)
                gens_b = gens[lo:hi] if generator_per_image else gens
                x = _denoise_chunk(unet, settings, x_noise_b, ids_b, gens_b, init)  # (b, C, H, W)
                chunks.append(x.float().clamp(-1, 1).cpu())
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return torch.cat(chunks)  # (N, C, H, W)


def classifier_guidance(
    log_prob: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> GuidanceFn:
    """Turn ``log_prob(x_t, t, class_ids) -> (B,) log p(c | x_t)`` into a ``guidance_fn``."""

    def guidance_fn(x_t: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        x = x_t.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(log_prob(x, t, class_ids).sum(), x)
        return grad  # (B, C, H, W)

    return guidance_fn


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8 (grey images are repeated to RGB)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)


# ----------------------------------------------------------------------------- LR schedule


def build_lr_schedule(opt: torch.optim.Optimizer, optim: OptimConfig, steps: int) -> Any:
    """diffusers' LR schedule for ``optim.schedule``: linear warm-up over ``optim.warmup_steps``,
    then constant, or cosine/linear decay to 0 at ``steps``."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if optim.schedule == "constant" else optim.schedule
    return get_scheduler(
        name, opt, num_warmup_steps=optim.warmup_steps, num_training_steps=max(steps, 1)
    )


# ----------------------------------------------------------------------------- EMA


def build_ema(unet: torch.nn.Module, optim: OptimConfig, foreach: bool = False) -> EMAModel:
    """A diffusers ``EMAModel`` of ``unet``'s weights (kept on the unet's device).

    With ``optim.ema_warmup`` the decay ramps as 1 - (1 + step)^-3/4 (crowsonkb's warm-up, good for
    runs under ~100k steps) up to ``optim.ema_decay``, so short runs still get a usable EMA.
    ``foreach`` updates all weights in a few multi-tensor kernels (for GPUs: a kernel per weight
    tensor costs a launch each); off, each tensor is updated alone, as before.
    """
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    bare = unwrap(unet)
    return EMAModel(
        bare.parameters(),
        decay=optim.ema_decay,
        use_ema_warmup=optim.ema_warmup,
        inv_gamma=1.0,
        power=3 / 4,
        model_cls=UNet2DModel,
        model_config=bare.config,
        foreach=foreach,
    )


def ema_copy(unet: torch.nn.Module, ema: EMAModel) -> torch.nn.Module:
    """A copy of ``unet`` holding the EMA weights (for sampling; the training unet is untouched)."""
    model = copy.deepcopy(unwrap(unet))
    ema.copy_to(model.parameters())
    return model


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A loaded checkpoint directory. ``unet`` holds the EMA weights when there are any."""

    unet: UNet2DModel
    raw_unet: UNet2DModel
    ema: EMAModel | None
    optimizer_state: dict | None  # None unless loaded with optimizer=True
    step: int
    config: dict
    vocab: Vocabulary
    noise: NoiseConfig | None  # from config["noise"]; None if the job config has none
    extra: dict = field(default_factory=dict)
    path: Path | None = None


def save_checkpoint(
    path: str | Path,
    unet: torch.nn.Module,
    *,
    ema_unet: EMAModel | torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | dict | None = None,
    step: int,
    config: dict,
    vocab: Vocabulary,
    extra: dict | None = None,
) -> Path:
    """Write a self-describing checkpoint directory; a path alone reloads it.

    Layout: ``unet/`` and ``ema/`` (plain diffusers ``save_pretrained`` dirs, so any diffusers code
    can load them), ``optimizer.pt``, ``state.json`` (step, extra and, for an ``EMAModel``, its
    decay state), ``config.json`` (the resolved job config) and ``classes.json`` (vocabulary).
    ``ema_unet`` is an ``EMAModel`` (see ``build_ema``) or a module already holding EMA weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unwrap(unet).save_pretrained(path / "unet")
    state: dict[str, Any] = {"step": step, "extra": extra or {}}
    if isinstance(ema_unet, torch.nn.Module):
        unwrap(ema_unet).save_pretrained(path / "ema")
    elif ema_unet is not None:
        ema_copy(unet, ema_unet).save_pretrained(path / "ema")
        state["ema"] = {k: v for k, v in ema_unet.state_dict().items() if k != "shadow_params"}
    if optimizer is not None:
        opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        torch.save(opt_state, path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps(state, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
    vocab.save(path / "classes.json")
    return path


def load_checkpoint(
    path: str | Path,
    *,
    ema: bool = True,
    map_location: str | torch.device = "cpu",
    optimizer: bool = False,
) -> Checkpoint:
    """Load a directory written by ``save_checkpoint`` (models in eval mode on ``map_location``).

    ``optimizer.pt`` is read only with ``optimizer=True`` (resuming training); sampling and
    serving never open it. Every file is read as data: weights as safetensors only, the optimizer
    state with ``torch.load(weights_only=True)``, so a crafted checkpoint cannot run code.
    """
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    path = Path(path)
    if not (path / "unet").is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a pathloop checkpoint (no unet/ inside)")

    def unet_from(d: Path) -> UNet2DModel:  # low_cpu_mem_usage: no `accelerate` warning
        unet = UNet2DModel.from_pretrained(d, low_cpu_mem_usage=False, use_safetensors=True)
        return unet.to(map_location).eval()

    raw = unet_from(path / "unet")
    state = json.loads((path / "state.json").read_text())
    ema_model, unet = None, raw
    if (path / "ema").is_dir():
        ema_unet = unet_from(path / "ema")
        ema_model = EMAModel(
            ema_unet.parameters(), model_cls=UNet2DModel, model_config=ema_unet.config
        )  # shadow params = the saved EMA weights
        ema_model.load_state_dict(state.get("ema", {}))  # decay, warm-up, optimization_step
        unet = ema_unet if ema else raw
    opt_file = path / "optimizer.pt"
    optimizer_state = None
    if optimizer and opt_file.exists():  # tensors and plain containers only: no pickled code
        optimizer_state = torch.load(opt_file, map_location=map_location, weights_only=True)
    config = json.loads((path / "config.json").read_text())
    noise = NoiseConfig.model_validate(config["noise"]) if "noise" in config else None
    return Checkpoint(
        unet=unet,
        raw_unet=raw,
        ema=ema_model,
        optimizer_state=optimizer_state,
        step=int(state["step"]),
        config=config,
        vocab=Vocabulary.load(path / "classes.json"),
        noise=noise,
        extra=state.get("extra", {}),
        path=path,
    )


def kept_checkpoints(path: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint the training run of checkpoint ``path`` kept on local
    disk, oldest first: the ``checkpoint_*`` dirs beside ``path`` and under the run's Ray
    storage (``train.storage`` or ``<workdir>/ray``, then ``<name>``, from its config.json)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    roots = {path.parent} if path.name.startswith("checkpoint_") else set()
    storage = (config.get("train") or {}).get("storage")
    if config.get("workdir") and config.get("name") and (storage is None or "://" not in storage):
        roots.add(Path(storage or Path(config["workdir"]) / "ray") / config["name"])
    found = {
        d.resolve()
        for root in roots
        if root.is_dir()
        for d in root.glob("checkpoint_*")
        if (d / "state.json").is_file()
    }
    steps = {d: int(json.loads((d / "state.json").read_text())["step"]) for d in found}
    return sorted((step, d) for d, step in steps.items())
