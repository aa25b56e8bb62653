"""Pure per-sample losses. Each returns a (B,) vector (or combines given vectors into a scalar);
callers weight, reduce and backpropagate.

- ``diffusion_loss``: the denoising error of Ho et al. 2020 (eps or v target), with class dropout.
- ``reward_weighted_loss``: Eq. 3 of Sun et al. 2023 (reward-weighted fine-tuning).
- ``reward_mse_loss``: Eq. 2 of Sun et al. 2023 (the reward model's regression loss).
- ``dpo_loss``: Diffusion-DPO (Wallace et al. 2023) on per-sample denoising errors.
- ``nft_loss``: negative-aware finetuning (DiffusionNFT, Zheng et al. 2026) on predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pathloop.diffusion import null_class


def diffusion_loss(
    unet: torch.nn.Module,
    scheduler,
    x0: torch.Tensor,
    class_ids: torch.Tensor,
    *,
    p_uncond: float = 0.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample denoising MSE ``||target - unet(x_t, t, c)||^2`` averaged over (C, H, W): (B,).

    x0: (B, C, H, W) images in [-1, 1]; class_ids: (B,) ints. t ~ U{0..T-1} and noise ~ N(0, I)
    are drawn from ``generator`` unless given (pass the same ``noise``/``timesteps`` to a model and
    its reference, as DPO needs). With probability ``p_uncond`` a class id becomes the null class
    (classifier-free guidance training). The target is eps, or v = sqrt(ab) eps - sqrt(1-ab) x0
    for ``prediction_type="v_prediction"`` (``scheduler.get_velocity``).
    """
    b, device = x0.shape[0], x0.device
    gen_device = generator.device if generator is not None else device
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(device)
    if timesteps is None:
        t_max = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, t_max, (b,), generator=generator, device=gen_device)
    timesteps = timesteps.to(device).long()  # (B,)
    labels = class_ids.to(device).long()  # (B,)
    if p_uncond > 0:
        drop = torch.rand((b,), generator=generator, device=gen_device).to(device) < p_uncond
        labels = torch.where(drop, torch.full_like(labels, null_class(unet)), labels)

    x_t = scheduler.add_noise(x0, noise, timesteps)  # (B, C, H, W)
    pred = unet(x_t, timesteps, class_labels=labels).sample  # (B, C, H, W)
    err = (pred.float() - denoising_target(scheduler, x0, noise, timesteps).float()) ** 2
    return err.flatten(1).mean(dim=1)  # (B,)


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """What the UNet is trained to predict at (x0, noise, t): eps, or v = sqrt(ab) eps -
    sqrt(1-ab) x0 for ``prediction_type="v_prediction"``; (B, C, H, W)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def nft_loss(
    pred: torch.Tensor,
    old_pred: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    beta: float = 1.0,
) -> torch.Tensor:
    """Negative-aware finetuning (DiffusionNFT, Zheng et al. 2026) on one noised image each: (B,).

    pred: (B, C, H, W) the model's prediction; old_pred: the same from the frozen model that drew
    the images (no gradient); target: ``denoising_target``; r: (B,) optimality in [0, 1] (1
    plausible, 0 not, 0.5 no information). Two implicit policies share the model's parameters::

        v+ = (1 - beta) v_old + beta v        (trained toward the images the expert accepts)
        v- = (1 + beta) v_old - beta v        (trained toward the images the expert rejects)
        L  = r ||v+ - target||^2 + (1 - r) ||v- - target||^2

    Fitting v- to a rejected image moves v itself away from it, so implausible samples teach
    too, which Eq. 3 (weight ~ 0) cannot. The derivation holds for any prediction that is linear
    in the network output and whose loss is an MSE to a fixed target: DiffusionNFT writes it for
    the flow-matching velocity; pathloop's UNet predicts v = sqrt(ab) eps - sqrt(1-ab) x0 (or eps),
    and x_t, the target and v_old are the same for both policies, so v+ and v- are fitted to
    this target unchanged. With r = 0.5 for every image the gradient is 2 beta^2 (v - v_old): the
    model stays at the old one, so only the reward's deviation from 0.5 moves it.
    """
    old = old_pred.detach().float()
    v, tgt = pred.float(), target.float()
    pos = (1 - beta) * old + beta * v  # (B, C, H, W)
    neg = (1 + beta) * old - beta * v
    r = r.detach().to(v).view(-1, *([1] * (v.dim() - 1)))  # (B, 1, 1, 1)
    err = r * (pos - tgt) ** 2 + (1 - r) * (neg - tgt) ** 2
    return err.flatten(1).mean(dim=1)  # (B,)


def reward_weighted_loss(
    per_sample_syn: torch.Tensor,
    rewards: torch.Tensor,
    per_sample_real: torch.Tensor | None = None,
    beta_r: float | None = 0.0,
) -> torch.Tensor:
    """Reward-weighted denoising loss, Eq. 3 of Sun et al. 2023: a scalar.

    L(theta) = E_syn[ r(x, c) * l_theta(x, c) ] + beta_r * E_real[ l_theta(x, c) ]

    per_sample_syn: (B,) ``diffusion_loss`` of synthetic images; rewards: (B,) their reward
    (probability an expert calls the image plausible; no gradient flows into it);
    per_sample_real: (M,) ``diffusion_loss`` of real images, a regulariser that keeps the model
    close to the data. beta_r = 0/None or no real batch -> only the first term.
    """
    loss = (rewards.detach().to(per_sample_syn) * per_sample_syn).mean()  # E_syn[r * l]
    if beta_r and per_sample_real is not None and per_sample_real.numel() > 0:
        loss = loss + beta_r * per_sample_real.mean()  # + beta_r * E_real[l]
    return loss


def reward_mse_loss(
    pred_syn: torch.Tensor,
    target_syn: torch.Tensor,
    pred_real: torch.Tensor | None = None,
    target_real: torch.Tensor | None = None,
    lambda_r: float | None = 0.0,
) -> torch.Tensor:
    """Reward-model regression loss, Eq. 2 of Sun et al. 2023: a scalar.

    L(phi) = E_syn[(r_phi(x, c) - y)^2] + lambda_r * E_real[(r_phi(x, c) - y_real)^2]

    pred_*: (B,)/(M,) reward predictions in [0, 1]; target_*: expert labels / real targets.
    Convention: the paper labels an image 1 when an expert calls it *implausible*; pathloop's
    reward is the probability an expert calls it *plausible*, i.e. target = 1 - y_paper, so real
    images (plausible by construction) have target 1. lambda_r = 0/None or no real batch -> only
    the first term.
    """
    loss = ((pred_syn - target_syn.to(pred_syn)) ** 2).mean()  # E_syn[(r - y)^2]
    if lambda_r and pred_real is not None and target_real is not None and pred_real.numel() > 0:
        loss = loss + lambda_r * ((pred_real - target_real.to(pred_real)) ** 2).mean()
    return loss


def dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Diffusion-DPO (Wallace et al. 2023) on per-sample denoising errors: (B,).

    With e = ||eps - eps(x_t, t, c)||^2 for the preferred (w) and rejected (l) image of a pair,
    both models seeing the same t and noise:

        delta = (e_model_w - e_ref_w) - (e_model_l - e_ref_l)
        L     = -log sigmoid(-beta * delta)

    (The paper's beta * T factor and any weighting are folded into ``beta`` by the caller.)
    dL/d delta = beta * sigmoid(beta * delta), so at model == reference (delta = 0) L = log 2 and
    dL/de_model_w = +beta/2, dL/de_model_l = -beta/2: not zero in general, but the two cancel when
    w and l are the same image and noise (a tie), since then e_model_w == e_model_l as functions
    of the weights. Lowering the model's winner error (or raising its loser error) lowers L.
    The reference errors are treated as constants (detached).
    """
    delta = (model_err_w - ref_err_w.detach()) - (model_err_l - ref_err_l.detach())  # (B,)
    return -F.logsigmoid(-beta * delta)  # (B,)


def preference_loss(
    model_err_a: torch.Tensor,
    model_err_b: torch.Tensor,
    ref_err_a: torch.Tensor,
    ref_err_b: torch.Tensor,
    sign_a: torch.Tensor,
    sign_b: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Diffusion-DPO generalised to MAGIC's pair labels: (B,).

    Each image of a pair carries a sign: +1 wins (its denoising error should fall relative to the
    reference), -1 loses. MAGIC (Wang et al. 2025) labels a pair win/lose by the higher checklist
    score, both-win when they tie above the bar, both-lose when both are at or below it
    (``finetune.magic_pair_signs``); ties train only with ``dpo_ties``:

        delta = s_a (e_model_a - e_ref_a) + s_b (e_model_b - e_ref_b)
        L     = -log sigmoid(-beta * delta)

    With (s_a, s_b) = (+1, -1) this is exactly ``dpo_loss`` (a = winner, b = loser).
    """
    delta = sign_a.to(model_err_a) * (model_err_a - ref_err_a.detach()) + sign_b.to(model_err_b) * (
        model_err_b - ref_err_b.detach()
    )  # (B,)
    return -F.logsigmoid(-beta * delta)  # (B,)
