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


# ----------------------------------------------------------------------------- negative-aware


def test_nft_loss_hand_values():
    """r = 1 fits v+ = (1-b) v_old + b v, r = 0 fits v- = (1+b) v_old - b v, to the same target."""
    from pathloop.losses import nft_loss

    v, old, tgt = (
        torch.full((2, 1, 1, 1), 2.0),
        torch.full((2, 1, 1, 1), 1.0),
        torch.zeros(2, 1, 1, 1),
    )
    out = nft_loss(v, old, tgt, torch.tensor([1.0, 0.0]), beta=0.5)
    assert torch.allclose(out, torch.tensor([1.5**2, 0.5**2]))  # v+ = 1.5, v- = 0.5


def test_nft_moves_toward_accepted_and_away_from_rejected_images():
    """At v = v_old, a gradient step brings the prediction closer to an accepted image's target
    and further from a rejected one's; r = 0.5 (no information) leaves it where it is."""
    from pathloop.losses import nft_loss

    g = torch.Generator().manual_seed(0)
    old, tgt = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    v = old.clone().requires_grad_(True)
    nft_loss(v, old, tgt, torch.tensor([1.0, 0.0, 0.5]), beta=1.0).sum().backward()
    step = old - 0.1 * v.grad  # one plain gradient step from v_old
    dist = lambda a: ((a - tgt) ** 2).flatten(1).sum(1)  # noqa: E731
    before, after = dist(old), dist(step)
    assert after[0] < before[0]  # accepted: toward its target
    assert after[1] > before[1]  # rejected: away from its target
    assert torch.all(v.grad[2] == 0)  # r = 0.5: no gradient at the old model


def test_nft_finetune_loss_trains_the_model_and_not_the_frozen_one():
    """method=nft in finetune_loss: finite loss, gradients in the model, none in the frozen copy,
    and rewards of 0.5 everywhere give no gradient while the two models agree."""
    import numpy as np

    from pathloop.config import load_config
    from pathloop.finetune import FinetuneConfig, finetune_loss
    from pathloop.harness import build_state

    cfg = load_config(
        FinetuneConfig,
        None,
        ["model.block_out_channels=[16, 32]", "model.layers_per_block=1", "train.batch_size=4"]
        + ["method=nft", "beta_r=0", "real=unused"],
    )
    st = build_state(cfg, 4, torch.device("cpu"))
    ref = copy.deepcopy(st.raw).eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    data = {
        "images": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "class_ids": np.array([0, 1, 2, 3]),
        "weights": np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32),
        "pairs": np.zeros((0, 4), dtype=np.int64),
        "real_images": np.zeros((0, 32, 32, 3), dtype=np.uint8),
        "real_class_ids": np.zeros(0, dtype=np.int64),
    }
    loss = finetune_loss(cfg, st, ref, data, 0, 0, 1)
    loss.backward()
    assert torch.isfinite(loss)
    assert sum(p.grad.abs().sum() for p in st.raw.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in ref.parameters())
    st.opt.zero_grad(set_to_none=True)
    data["weights"] = np.full(4, 0.5, dtype=np.float32)
    finetune_loss(cfg, st, ref, data, 0, 0, 1).backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in st.raw.parameters())


# ----------------------------------------------------------------------------- dpo in finetune_loss


def _dpo_setup(ties: bool = False):
    """A tiny model at its frozen reference and six images of three classes (two each)."""
    import numpy as np

    from pathloop.config import load_config
    from pathloop.finetune import FinetuneConfig
    from pathloop.harness import build_state

    cfg = load_config(
        FinetuneConfig,
        None,
        ["model.block_out_channels=[16, 32]", "model.layers_per_block=1", "train.batch_size=4"]
        + ["method=dpo", "beta_r=0", "real=unused", f"dpo_ties={ties}"],
    )
    torch.manual_seed(0)
    st = build_state(cfg, 4, torch.device("cpu"))
    ref = copy.deepcopy(st.raw).eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    data = {
        "images": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        "class_ids": np.array([0, 0, 1, 1, 2, 2]),
        "weights": np.zeros(6, dtype=np.float32),
        "real_images": np.zeros((0, 32, 32, 3), dtype=np.uint8),
        "real_class_ids": np.zeros(0, dtype=np.int64),
    }
    return cfg, st, ref, data


def _dpo_grad(cfg, st, ref, data, pairs) -> torch.Tensor:
    """The flattened gradient of finetune_loss (method=dpo) on ``pairs``."""
    import numpy as np

    from pathloop.finetune import finetune_loss

    st.opt.zero_grad(set_to_none=True)
    finetune_loss(cfg, st, ref, {**data, "pairs": np.array(pairs)}, 0, 0, 1).backward()
    return torch.cat([p.grad.flatten() for p in st.raw.parameters() if p.grad is not None])


def test_a_tied_pair_carries_no_gradient_unless_dpo_ties():
    """Both win / both lose add nothing to the gradient by default (MAGIC's code weighs ties 0);
    with dpo_ties they do, since at the reference a tie pushes each image on its own."""
    won = [[4, 5, 1, -1]]
    mixed = [[0, 1, 1, 1], [2, 3, -1, -1], *won]
    cfg, st, ref, data = _dpo_setup(ties=False)
    g_won = _dpo_grad(cfg, st, ref, data, won)
    assert g_won.abs().max() > 1e-6  # a won pair trains
    assert torch.equal(_dpo_grad(cfg, st, ref, data, mixed), g_won)  # the ties add nothing
    cfg, st, ref, data = _dpo_setup(ties=True)
    assert (_dpo_grad(cfg, st, ref, data, mixed) - g_won).abs().max() > 1e-6
    g_tie = _dpo_grad(cfg, st, ref, data, [[0, 1, 1, 1]])
    assert g_tie.abs().max() > 1e-6  # why ties are dropped: each alone is not zero


def test_the_two_images_of_a_pair_share_noise_t_and_dropout(monkeypatch):
    """Every denoising error of a dpo step (model and reference, image a and b) sees the same
    noise, timesteps and labels, row by row; N ranks draw what one rank does."""
    import numpy as np

    import pathloop.losses as L
    from pathloop.finetune import _finetune_batch, finetune_loss

    cfg, st, ref, data = _dpo_setup()
    cfg = cfg.model_copy(update={"p_uncond": 0.5})  # some labels dropped, alike in a pair
    seen, real = [], L.diffusion_loss

    def spy(unet, scheduler, x0, class_ids, **kw):
        seen.append((kw["noise"], kw["timesteps"], class_ids))
        return real(unet, scheduler, x0, class_ids, **kw)

    monkeypatch.setattr(L, "diffusion_loss", spy)
    pairs = np.array([[0, 1, 1, -1], [2, 3, -1, 1], [4, 5, 1, -1]])
    finetune_loss(cfg, st, ref, {**data, "pairs": pairs}, 3, 0, 1)
    assert len(seen) == 4  # model a, b; reference a, b
    for noise, t, y in seen[1:]:
        assert torch.equal(noise, seen[0][0]) and torch.equal(t, seen[0][1])
        assert torch.equal(y, seen[0][2])
    assert len(set(seen[0][1].tolist())) > 1  # rows differ; only the two images of a row agree
    whole = _finetune_batch(cfg, 3, 3, 0, (3, 32, 32), 0, 1)
    halves = [_finetune_batch(cfg, 3, 3, 0, (3, 32, 32), k, 2) for k in (0, 1)]
    for w, a, b in zip(whole, *halves, strict=True):
        assert torch.equal(w, torch.cat([a, b]))
