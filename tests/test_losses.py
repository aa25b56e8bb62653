"""losses.py: hand-computed values on tiny tensors, and the DPO gradient facts on a tiny UNet."""

import copy
import math

import pytest
import torch

from pathloop import diffusion as D
from pathloop.config import ModelConfig, NoiseConfig
from pathloop.losses import diffusion_loss, dpo_loss, reward_mse_loss, reward_weighted_loss

TINY = ModelConfig(sample_size=16, block_out_channels=(16, 32), layers_per_block=1)


def _unet():
    torch.manual_seed(0)
    return D.build_unet(TINY, 3)


def _batch(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, 16, 16, generator=g) * 2 - 1  # (B, C, H, W)
    noise = torch.randn(b, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return x0, noise, t, torch.arange(b) % 3


# ----------------------------------------------------------------------------- diffusion loss


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_matches_hand_computation(prediction_type):
    unet, sched = _unet(), D.build_scheduler(NoiseConfig(prediction_type=prediction_type))
    x0, noise, t, ids = _batch()
    loss = diffusion_loss(unet, sched, x0, ids, noise=noise, timesteps=t)
    assert loss.shape == (4,)

    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    pred = unet(x_t, t, class_labels=ids).sample
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(dim=(1, 2, 3)))


def test_diffusion_loss_class_dropout_and_seeding():
    unet, sched = _unet(), D.build_scheduler(NoiseConfig())
    x0, noise, t, ids = _batch()
    null_ids = torch.full_like(ids, D.null_class(unet))
    fixed = dict(noise=noise, timesteps=t)
    with torch.no_grad():
        dropped = diffusion_loss(unet, sched, x0, ids, p_uncond=1.0, **fixed)
        torch.testing.assert_close(dropped, diffusion_loss(unet, sched, x0, null_ids, **fixed))
        a, b = (
            diffusion_loss(unet, sched, x0, ids, generator=torch.Generator().manual_seed(3))
            for _ in range(2)
        )
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- Sun et al. 2023


def test_reward_weighted_loss_eq3():
    syn = torch.tensor([1.0, 2.0, 3.0])
    r = torch.tensor([1.0, 0.5, 0.0])
    real = torch.tensor([4.0, 2.0])
    # mean(r * l_syn) = (1 + 1 + 0) / 3; beta_r * mean(l_real) = 0.5 * 3
    assert reward_weighted_loss(syn, r, real, 0.5).item() == pytest.approx(2 / 3 + 1.5)
    assert reward_weighted_loss(syn, r, real, 0.0).item() == pytest.approx(2 / 3)
    assert reward_weighted_loss(syn, r, None, 0.5).item() == pytest.approx(2 / 3)
    syn.requires_grad_(True)
    reward_weighted_loss(syn, r, None, 0.0).backward()
    torch.testing.assert_close(syn.grad, r / 3)  # the reward weights each sample's gradient


def test_reward_mse_loss_eq2():
    pred, target = torch.tensor([0.5, 1.0]), torch.tensor([1.0, 0.0])
    pred_real, target_real = torch.tensor([0.8, 0.6]), torch.tensor([1.0, 1.0])
    # ((-0.5)^2 + 1^2) / 2 = 0.625; real: (0.04 + 0.16) / 2 = 0.1
    assert reward_mse_loss(pred, target, pred_real, target_real, 2.0).item() == pytest.approx(0.825)
    assert reward_mse_loss(pred, target, pred_real, target_real, 0.0).item() == pytest.approx(0.625)
    assert reward_mse_loss(pred, target, None, None, 2.0).item() == pytest.approx(0.625)


# ----------------------------------------------------------------------------- Diffusion-DPO


def test_dpo_loss_hand_values():
    t = torch.tensor
    # delta = (1 - 1.5) - (2 - 1.5) = -1, beta 2 -> -log sigmoid(2) = log(1 + e^-2)
    # delta = (2 - 1) - (1 - 0.5) = 0.5, beta 2 -> -log sigmoid(-1) = log(1 + e^1)
    loss = dpo_loss(t([1.0, 2.0]), t([2.0, 1.0]), t([1.5, 1.0]), t([1.5, 0.5]), beta=2.0)
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(math.log1p(math.exp(-2)))
    assert loss[1].item() == pytest.approx(math.log1p(math.exp(1.0)))
    loss = dpo_loss(t([2.0]), t([1.0]), t([1.0]), t([0.5]), beta=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(0.5)))


def test_dpo_loss_at_reference_is_log2_with_gradient_beta_over_2():
    mw = torch.tensor([0.3, 1.2], requires_grad=True)
    ml = torch.tensor([0.7, 0.4], requires_grad=True)
    loss = dpo_loss(mw, ml, mw.detach(), ml.detach(), beta=3.0)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))
    loss.sum().backward()
    torch.testing.assert_close(mw.grad, torch.full((2,), 1.5))  # +beta/2
    torch.testing.assert_close(ml.grad, torch.full((2,), -1.5))  # -beta/2


def test_dpo_loss_falls_when_winner_error_drops():
    ml, rw, rl = torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0])
    losses = [dpo_loss(torch.tensor([mw]), ml, rw, rl, beta=5.0).item() for mw in (1.2, 1.0, 0.8)]
    assert losses[0] > losses[1] > losses[2]


def _dpo_grads(w: torch.Tensor, lose: torch.Tensor) -> list[torch.Tensor]:
    """Grads of the mean DPO loss w.r.t. the model's weights, the model equal to the reference."""
    model, sched = _unet(), D.build_scheduler(NoiseConfig())
    ref = copy.deepcopy(model).requires_grad_(False)
    _, noise, t, ids = _batch(2, seed=1)
    # winner and loser images are denoised from the same noise and t (as in Diffusion-DPO)
    kw = dict(noise=torch.cat([noise, noise]), timesteps=torch.cat([t, t]))
    x, c = torch.cat([w, lose]), torch.cat([ids, ids])  # (2B, C, H, W), (2B,)
    err_w, err_l = diffusion_loss(model, sched, x, c, **kw).chunk(2)  # (B,) each
    ref_w, ref_l = diffusion_loss(ref, sched, x, c, **kw).chunk(2)
    dpo_loss(err_w, err_l, ref_w, ref_l, beta=10.0).mean().backward()
    return [p.grad for p in model.parameters() if p.grad is not None]


def test_dpo_gradient_is_zero_for_a_tie_at_the_reference():
    x0, *_ = _batch(2, seed=1)
    grads = _dpo_grads(x0, x0)  # winner == loser: the +beta/2 and -beta/2 terms cancel
    assert grads and max(g.abs().max().item() for g in grads) < 1e-6
    other, *_ = _batch(2, seed=2)
    grads = _dpo_grads(x0, other)  # a real preference: the model is pushed
    assert max(g.abs().max().item() for g in grads) > 1e-4


def test_preference_loss_generalises_dpo():
    from pathloop.losses import dpo_loss, preference_loss

    mw, ml = torch.tensor([0.3, 0.8]), torch.tensor([0.5, 0.1])
    rw, rl = torch.tensor([0.4, 0.6]), torch.tensor([0.2, 0.3])
    one, neg = torch.ones(2), -torch.ones(2)
    # (+1, -1) is standard Diffusion-DPO with a the winner
    assert torch.allclose(
        preference_loss(mw, ml, rw, rl, one, neg, 2.0), dpo_loss(mw, ml, rw, rl, 2.0)
    )
    # both win: delta = (0.3-0.4) + (0.5-0.2) = 0.2 for pair 0 → -log sigmoid(-0.4)
    both = preference_loss(mw, ml, rw, rl, one, one, 2.0)
    assert both[0].item() == pytest.approx(
        -torch.nn.functional.logsigmoid(torch.tensor(-0.4)).item()
    )
    # both lose: the sign flips, delta = -0.2
    lose = preference_loss(mw, ml, rw, rl, neg, neg, 2.0)
    assert lose[0].item() == pytest.approx(
        -torch.nn.functional.logsigmoid(torch.tensor(0.4)).item()
    )
