"""Finetuning with feedback (step 3 of Sun et al. 2023): the reward-weighted loss of Eq. 3, or
MAGIC's preference route (Diffusion-DPO on pairs built from checklist scores), each plus
beta_r times the plain loss on real images. With ``weigh_real`` the real images are weighed by
their rewards too (the reward model's or the expert's), so the feedback reaches the data as well
as the model's own samples.

``FinetuneConfig`` is the job's manual; ``finetune_loss`` assembles the loss of one step from the
pure per-sample losses of ``losses.py``; ``finetune_loop`` is the Ray Train worker loop and
``run_finetune`` the driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pathloop.config import (
    Frozen,
    ModelConfig,
    NoiseConfig,
    OptimConfig,
    SamplerConfig,
    TrackingConfig,
    WorkersConfig,
    updated,
)
from pathloop.harness import (
    MlflowRun,
    TrainConfig,
    WorkerInputs,
    build_state,
    finish_run,
    fit,
    optimized,
    prepare_run,
    train_diffusion,
    worker_context,
)

# ----------------------------------------------------------------------------- config


class FinetuneConfig(Frozen):
    """Step 3 of Sun et al. 2023 (method=reward), negative-aware finetuning (method=nft) or
    MAGIC's preference route (method=dpo)."""

    workdir: str = Field("runs/finetune", description="Checkpoints, Ray results, result.json.")
    name: str = Field("finetune", description="Run name (Ray run dir and MLflow run).")
    resume: bool = Field(False, description="Continue from the latest checkpoint in workdir.")
    max_failures: int = Field(2, ge=-1, description="Worker failures Ray Train recovers from.")
    method: Literal["reward", "nft", "dpo"] = Field(
        "reward",
        description="reward: Eq. 3 (re-weights plausible samples); nft: negative-aware "
        "finetuning (DiffusionNFT: learns from implausible samples too); dpo: Diffusion-DPO.",
    )
    pretrained: str = Field("runs/pretrain/result.json", description="Model to start from.")
    synthetic: str | None = Field(
        "runs/samples",
        description=(
            "Synthetic images: a shard set or a feedback.parquet (dpo needs its fail_* columns "
            "unless a reward model scores them); None with reward_mode=none: no synthetic set, "
            "the beta_r term on the real images alone (the no-feedback control without a pool)."
        ),
    )
    reward_model: str | None = Field(None, description="Reward model ref (path or MLflow URI).")
    rewards: str | None = Field(
        None,
        description=(
            "Precomputed rewards of the synthetic images instead of a reward model: a CSV or "
            "Parquet table with columns id and reward (>= 0), one row per synthetic image, e.g. "
            "the expert's own verdicts (the oracle arm of `pathloop experiment`)."
        ),
    )
    real: str | None = Field(None, description="Real shard set for the beta_r term.")
    real_split: str | None = Field("train", description="Split of the real shards.")
    beta_r: float = Field(1.0, ge=0, description="Weight of the plain loss on real images.")
    weigh_real: bool = Field(
        False,
        description="Weigh the beta_r term's real images by their rewards too (real_rewards=, "
        "else the reward model scores them), shaped by real_reward_mode: the expert's "
        "knowledge applied to the data, not only to the model's samples. With method=reward "
        "the real rows are drawn in proportion to their weights (0/1 verdicts: the curated "
        "data); with method=nft they enter the negative-aware loss, so a rejected real image "
        "pushes the model away from it.",
    )
    real_nft: bool = Field(
        True,
        description="weigh_real with method=nft: the real images enter the negative-aware loss "
        "(True), or are drawn in proportion to their weights and fitted with the plain loss as "
        "with method=reward (False; 0/1 verdicts: the curated data, nothing pushes away).",
    )
    real_rewards: str | None = Field(
        None,
        description="weigh_real: precomputed rewards of the real images, a CSV or Parquet "
        "table of id and reward over the real split (e.g. the expert's verdicts on it).",
    )
    real_labels: str | None = Field(
        None,
        description="weigh_real with a reward model: the expert's labels of some real train "
        "images (a CSV or Parquet table of id and plausible 1/0, such as the feedback export of "
        "a review of real cells). The reward model's scores of the real images are shifted per "
        "class, one logit offset each, so that their mean over the class equals the acceptance "
        "among its labelled images; the order within a class stays the reward model's. A reward "
        "model fitted to a few labels per class can misjudge a class's level, and nft pushes the "
        "model away from every real image scored below 0.5.",
    )
    real_reward_mode: Literal["raw", "threshold", "class_norm", "class_z"] | None = Field(
        None,
        description="weigh_real: how the real images' rewards become weights (as reward_mode); "
        "None: raw for method=nft (an accepted real image teaches as the plain loss does, a "
        "rejected one pushes away), else class_norm (each class keeps its weight in the beta_r "
        "term, the images the expert prefers count more).",
    )
    reward_mode: Literal["raw", "threshold", "class_norm", "class_z", "none", "ones"] = Field(
        "raw",
        description=(
            "raw r; threshold: 1[r >= reward_threshold]; class_norm: r / mean_class(r); "
            "class_z: 0.5 + 0.5 clip((r - mean_class) / std_class, -1, 1), in [0, 1] with 0.5 "
            "for a class whose images all score alike (Flow-GRPO's group normalisation; what "
            "nft expects); "
            "none: weights 0, the control arm (only the beta_r real term trains, so what the "
            "feedback adds is the difference to a run with it); ones: weights 1, self-training "
            "on the synthetic images without feedback. none and ones need no rewards."
        ),
    )
    reward_threshold: float = Field(0.5, ge=0, le=1, description="For reward_mode=threshold.")
    dpo_beta: float = Field(100.0, gt=0, description="Diffusion-DPO beta (per-pixel MSE errors).")
    dpo_lose_bar: float = Field(
        0.4,
        ge=0,
        le=1,
        description="method=dpo, pairs from scores: both images of a pair lose when neither "
        "passes more than this fraction of the criteria (MAGIC: 2 of 5).",
    )
    dpo_win_bar: float = Field(
        1.0,
        ge=0,
        le=1,
        description="method=dpo, pairs from scores: both win when both pass at least this "
        "fraction (MAGIC: all criteria); equal scores above dpo_lose_bar win too.",
    )
    dpo_ties: bool = Field(
        False,
        description="method=dpo: train on tied pairs (both win, both lose) too, each image "
        "pushed on its own; False = only pairs with a winner train, as in MAGIC's released "
        "code (D3PO), where a tie weighs 0.",
    )
    pairs: str | None = Field(
        None,
        description=(
            "method=dpo: preference pairs an expert chose (`pathloop review pairs`), instead of "
            "pairs drawn from checklist scores: a Parquet or CSV table id_a, id_b, sign_a, "
            "sign_b (+1 win, -1 lose) over images of `synthetic` (the pairwise round's set)."
        ),
    )
    feedback_round: str | None = Field(None, description="Lineage: the feedback round id.")
    feedback_fraction: float | None = Field(None, description="Lineage: fraction of feedback used.")
    p_uncond: float = Field(0.1, ge=0, le=1, description="Class dropout kept during finetuning.")
    nft_beta: float = Field(
        1.0,
        gt=0,
        le=2,
        description="method=nft: how far the two implicit policies sit from "
        "the frozen model (DiffusionNFT's beta).",
    )
    nft_ref: float = Field(
        0.0,
        ge=0,
        description="method=nft: weight of ||v - v_start||^2, which keeps the model "
        "near the one it started from.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Set from `pretrained`.")
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Set from `pretrained`.")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=500, sample_every=0))
    preview: SamplerConfig = Field(default_factory=lambda: SamplerConfig(steps=25))
    scaling: WorkersConfig = Field(default_factory=WorkersConfig)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-finetune")
    )


class FinetuneInputs(WorkerInputs):
    """What ``run_finetune`` hands ``finetune_loop``."""

    cfg: FinetuneConfig = Field(description="The job's config, paths absolute.")
    pretrained_dir: str = Field(description="Local checkpoint dir of the model to start from.")
    data_file: str = Field(
        description="The driver's .npz: synthetic images, their weights or pairs, real rows."
    )


# --------------------------------------------------------------------- rewards and preference pairs

REWARD_FREE = ("none", "ones")  # reward modes whose weights need no rewards


def shape_rewards(r: Any, class_ids: Any, mode: str, threshold: float) -> Any:
    """Turn cached rewards (N,) into finetuning weights (N,) per ``reward_mode``."""
    import numpy as np

    r = np.asarray(r, dtype=np.float64)
    if mode == "none":  # the no-feedback control: the synthetic term weighs nothing
        return np.zeros_like(r)
    if mode == "ones":  # self-training: every synthetic image counts, whatever its reward
        return np.ones_like(r)
    if mode == "threshold":
        return (r >= threshold).astype(np.float64)
    if mode == "class_z":  # each class centred and scaled, mapped into [0, 1] around 0.5
        out = np.full_like(r, 0.5)
        for c in np.unique(class_ids):
            m = class_ids == c
            sd = r[m].std()
            if sd > 1e-8:
                out[m] = 0.5 + 0.5 * np.clip((r[m] - r[m].mean()) / sd, -1.0, 1.0)
        return out
    if mode == "class_norm":  # every class keeps the same total weight, whatever its reward level
        out = r.copy()
        for c in np.unique(class_ids):
            m = class_ids == c
            out[m] = r[m] / max(r[m].mean(), 1e-6)
        return out
    return r


SCORE_EPS = 1e-9  # checklist scores are fractions k/n: equal up to rounding means equal


def magic_pair_signs(
    s_a: float, s_b: float, lose_bar: float = 0.4, win_bar: float = 1.0
) -> tuple[int, int]:
    """MAGIC's label of one pair (Wang et al. 2025, App. A.2): (sign a, sign b), +1 win, -1 lose.

    ``s_a``, ``s_b`` are checklist scores as fractions of the criteria passed, so the rule holds
    for any number n of criteria; MAGIC's (5 criteria, summed scores S) is lose_bar = 2/5,
    win_bar = 1: max(S_a, S_b) <= 2 → both lose; min = 5 or S_a = S_b > 2 → both win; otherwise
    the higher score wins. With 7 criteria, at most 2 passed (2/7 <= 0.4 < 3/7) is a losing score.
    """
    if max(s_a, s_b) <= lose_bar + SCORE_EPS:
        return -1, -1
    if min(s_a, s_b) >= win_bar - SCORE_EPS or abs(s_a - s_b) <= SCORE_EPS:
        return 1, 1
    return (1, -1) if s_a > s_b else (-1, 1)


def preference_pairs(
    scores: Sequence[float] | np.ndarray,
    class_ids: Sequence[int] | np.ndarray,
    lose_bar: float = 0.4,
    win_bar: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Pair images of the same class at random, then label each pair by ``magic_pair_signs``.

    ``scores`` are checklist scores in [0, 1] (fraction of criteria passed, from the judge, the
    MLLM or per-criterion human labels). Returns an int array (P, 4): index a, index b, sign a,
    sign b (+1 win, -1 lose), ready for ``losses.preference_loss``. An odd image out of a class
    is left unpaired.
    """
    s = np.asarray(scores, dtype=float)
    c = np.asarray(class_ids)
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, int, int, int]] = []
    for cls in np.unique(c):
        idx = rng.permutation(np.flatnonzero(c == cls))
        for a, b in zip(idx[0::2], idx[1::2], strict=False):
            rows.append((int(a), int(b), *magic_pair_signs(s[a], s[b], lose_bar, win_bar)))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def pair_kinds(pairs: np.ndarray) -> dict[str, int]:
    """How many pairs (P, 4) have one winner, two winners, two losers."""
    sa, sb = pairs[:, 2], pairs[:, 3]
    return {
        "one_wins": int((sa != sb).sum()),
        "both_win": int(((sa == 1) & (sb == 1)).sum()),
        "both_lose": int(((sa == -1) & (sb == -1)).sum()),
    }


def training_pairs(pairs: np.ndarray, ties: bool) -> np.ndarray:
    """The pairs (P, 4) that train: all with ``ties``, else only those with one winner.

    A tie (both win or both lose) pushes both errors the same way, with no contrast between the
    two images: plain likelihood (or unlikelihood) training of each, not a preference. MAGIC's
    released code (D3PO) gives ties weight 0; dropping them rather than weighing them 0 keeps
    every row of a batch informative.
    """
    return pairs if ties else pairs[pairs[:, 2] != pairs[:, 3]]


# ----------------------------------------------------------------------------- the loss of one step


def _finetune_batch(
    cfg: FinetuneConfig, step: int, n_syn: int, n_real: int, shape, rank, world, real_p=None
):
    """This rank's slice of the step's global draw: synthetic/real indices, noise, t, dropout.
    Column 0 of ``noise`` and ``t`` serves a synthetic row, both images of a pair alike. Real
    rows are drawn uniformly, or in proportion to ``real_p`` (M,) when given."""
    import torch

    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    b = cfg.train.batch_size
    # (B,) synthetic rows (or pairs); drawn without a synthetic set too (n_syn 0), so that the
    # rest of the seeded stream is the same with or without a pool
    pick = torch.randint(0, max(n_syn, 1), (b,), generator=g)
    if real_p is None:
        pick_real = torch.randint(0, max(n_real, 1), (b,), generator=g)  # (B,)
    else:
        pick_real = torch.multinomial(real_p, b, replacement=True, generator=g)  # (B,)
    noise = torch.randn((b, 1, *shape), generator=g)  # (B, 1, C, H, W)
    noise_real = torch.randn((b, *shape), generator=g)  # (B, C, H, W)
    # (B, 2): column 1 is unused; drawing it keeps the seeded stream (and so runs) unchanged
    t = torch.randint(0, cfg.noise.num_train_timesteps, (b, 2), generator=g)
    drop = torch.rand(b, generator=g) < cfg.p_uncond
    drop_real = torch.rand(b, generator=g) < cfg.p_uncond
    sl = slice(rank * (b // world), (rank + 1) * (b // world))
    return pick[sl], pick_real[sl], noise[sl], noise_real[sl], t[sl], drop[sl], drop_real[sl]


def _to_x(images: Any, idx: Any) -> Any:
    """uint8 (N, H, W, 3) rows → float (b, C, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1


def finetune_loss(cfg, st, ref, data, step: int, rank: int, world: int):
    """Eq. 3 (reward), negative-aware finetuning (nft) or the preference loss (dpo) for this
    rank's slice, plus beta_r * real."""
    import torch

    from pathloop.diffusion import null_class
    from pathloop.losses import (
        denoising_target,
        diffusion_loss,
        nft_loss,
        preference_loss,
        reward_weighted_loss,
    )

    syn, cls, w = data["images"], data["class_ids"], data["weights"]
    pairs = training_pairs(data["pairs"], cfg.dpo_ties) if cfg.method == "dpo" else None
    n_syn = len(syn) if pairs is None else len(pairs)
    shape = (3, *data["real_images"].shape[1:3]) if not len(syn) else (3, *syn.shape[1:3])
    # Eq. 3 (or nft, real_nft=false) with weigh_real draws the real rows by their weights: the same
    # expectation as weighing them, with full batches (0/1 verdicts: exactly the curated data)
    resample = cfg.weigh_real and (cfg.method == "reward" or not cfg.real_nft)
    real_p = torch.from_numpy(data["real_weights"]).double() if resample else None
    pick, pick_real, noise, noise_real, t, drop, drop_real = _finetune_batch(
        cfg, step, n_syn, len(data["real_images"]), shape, rank, world, real_p
    )
    null, dev = null_class(st.raw), st.device
    noise, noise_real = noise.to(dev), noise_real.to(dev)  # drawn on the CPU for every rank alike

    def labels(idx):  # class ids of images idx, dropped to the null class where drop says: (b,)
        return torch.where(drop, null, torch.from_numpy(cls[idx.numpy()])).to(dev)

    def err(model, idx):  # per-sample denoising error of images idx (row i: noise i, t i): (b,)
        y, x0 = labels(idx), _to_x(syn, idx).to(dev)
        return diffusion_loss(model, st.scheduler, x0, y, noise=noise[:, 0], timesteps=t[:, 0])

    if cfg.method == "reward":
        # a pool that weighs 0 everywhere (the control, feedback-data; the weights are the same
        # on every rank), or none at all, has no gradient: its forward and backward are skipped
        idle = not w.any()
        r = torch.zeros(len(pick)) if idle else torch.from_numpy(w[pick.numpy()]).float()  # (b,)
        l_syn = torch.zeros(len(pick), device=dev) if idle else err(st.model, pick)  # (b,)
    elif cfg.method == "nft":
        y, x0, ts = labels(pick), _to_x(syn, pick).to(dev), t[:, 0].to(dev).long()
        x_t = st.scheduler.add_noise(x0, noise[:, 0], ts)  # (b, C, H, W)
        pred = st.model(x_t, ts, class_labels=y).sample
        with torch.no_grad():
            old = ref(x_t, ts, class_labels=y).sample  # the frozen model that drew the pool
        target = denoising_target(st.scheduler, x0, noise[:, 0], ts)
        r = torch.from_numpy(w[pick.numpy()]).float().clamp(0, 1)  # (b,) optimality in [0, 1]
        l_syn = nft_loss(pred, old, target, r, cfg.nft_beta)  # (b,)
        if cfg.nft_ref > 0:
            l_syn = l_syn + cfg.nft_ref * ((pred.float() - old.float()) ** 2).flatten(1).mean(1)
    else:
        p = torch.from_numpy(pairs[pick.numpy()])  # (b, 4): a, b, sign a, sign b
        # Both images of a pair share noise, t and class dropout (Diffusion-DPO), so the
        # contrast of their errors measures the images, not the draw.
        ea, eb = err(st.model, p[:, 0]), err(st.model, p[:, 1])
        with torch.no_grad():
            ra, rb = err(ref, p[:, 0]), err(ref, p[:, 1])
        l_pref = preference_loss(ea, eb, ra, rb, p[:, 2], p[:, 3], cfg.dpo_beta).mean()
    l_real = None
    if cfg.beta_r > 0 and len(data["real_images"]):
        # Class dropout on the real term too: without it the null class (CFG's unconditional
        # branch) learns only from reward-weighted synthetic rows and goes stale while the
        # conditional branch moves, and guidance then extrapolates the mismatch.
        y_real = torch.from_numpy(data["real_class_ids"][pick_real.numpy()])  # (b,)
        y = torch.where(drop_real, null, y_real)
        y, x_real = y.to(dev), _to_x(data["real_images"], pick_real).to(dev)
        if cfg.weigh_real and cfg.method == "nft" and cfg.real_nft:  # rejected ones push away
            w_real = torch.from_numpy(data["real_weights"][pick_real.numpy()]).float().to(dev)
            ts = t[:, 0].to(dev).long()
            x_t = st.scheduler.add_noise(x_real, noise_real, ts)
            pred = st.model(x_t, ts, class_labels=y).sample
            with torch.no_grad():
                old = ref(x_t, ts, class_labels=y).sample
            target = denoising_target(st.scheduler, x_real, noise_real, ts)
            l_real = nft_loss(pred, old, target, w_real.clamp(0, 1), cfg.nft_beta)  # (b,)
        else:  # the plain loss (weigh_real: on rows drawn by their weights)
            l_real = diffusion_loss(
                st.model, st.scheduler, x_real, y, noise=noise_real, timesteps=t[:, 0]
            )  # (b,)
    if cfg.method == "reward":
        return reward_weighted_loss(l_syn, r, l_real, cfg.beta_r)  # Eq. 3, Sun et al. 2023
    l_fb = l_syn.mean() if cfg.method == "nft" else l_pref
    return l_fb + (cfg.beta_r * l_real.mean() if l_real is not None else 0.0)


# ----------------------------------------------------------------------------- Ray Train loop


def finetune_loop(config: dict) -> None:
    """Ray Train worker loop for finetuning. Data are small (a review round and the real train
    split), so each worker holds them in memory; rows are drawn per step from the seeded global
    draw and sliced by rank, as in pretraining."""
    inputs = FinetuneInputs.model_validate(config)
    import copy

    import numpy as np
    import ray.train.torch
    import torch

    from pathloop.diffusion import load_checkpoint, use_channels_last

    cfg = inputs.cfg
    rank, world, device = worker_context(cfg)
    start = load_checkpoint(inputs.pretrained_dir)  # EMA weights of the pretrained model
    frozen = cfg.method in ("dpo", "nft")  # the reference (dpo), the model that drew the pool (nft)
    ref = copy.deepcopy(start.unet).eval().requires_grad_(False) if frozen else None
    ref = ref.to(device) if ref is not None else None  # the frozen reference beside the model
    if ref is not None and use_channels_last(cfg.train.channels_last, device):
        ref = ref.to(memory_format=torch.channels_last)  # the layout build_state gives the model
    st = build_state(
        cfg, len(inputs.vocab), device, wrap=ray.train.torch.prepare_model, init_unet=start.unet
    )
    data = dict(np.load(inputs.data_file, allow_pickle=False))

    def loss_fn(s: int) -> tuple[Any, dict]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=st.autocast):
            return finetune_loss(cfg, st, ref, data, s, rank, world), {}

    train_diffusion(cfg, st, inputs, rank, optimized(st, cfg.optim.grad_clip, loss_fn))


# ----------------------------------------------------------------------------- driver


def _finetune_data(cfg: FinetuneConfig, vocab, out: Path) -> dict[str, Any]:
    """Load the synthetic set, compute rewards (cached) or pairs, load real rows; save as .npz."""
    import numpy as np

    from pathloop.data import load_arrays, load_image_table

    real_x, real_y = (
        load_arrays(cfg.real, split=cfg.real_split)
        if cfg.real
        else (np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.int64))
    )
    if cfg.synthetic:
        images, class_ids, cols = load_image_table(cfg.synthetic)
    else:  # the real term alone: an empty synthetic set of the real images' shape
        images, class_ids = np.zeros((0, *real_x.shape[1:]), np.uint8), np.zeros(0, np.int64)
        cols = {"id": np.zeros(0, str)}
    if not len(real_x):
        real_x = np.zeros((0, *images.shape[1:]), np.uint8)
    scores = _scores(cfg, images, class_ids, cols, out.parent / "rewards.npz")  # (N,)
    weights = shape_rewards(scores, class_ids, cfg.reward_mode, cfg.reward_threshold)
    if cfg.pairs:
        pairs = given_pairs(cfg.pairs, cols["id"], class_ids)  # (P, 4)
    elif cfg.method == "dpo":
        bars = (cfg.dpo_lose_bar, cfg.dpo_win_bar)
        pairs = preference_pairs(scores, class_ids, *bars, seed=cfg.train.seed)  # (P, 4)
    else:
        pairs = np.zeros((0, 4), np.int64)
    if cfg.method == "dpo" and len(pairs) == 0:
        raise ValueError("no preference pairs: each class needs at least 2 synthetic images")
    kinds, trained = pair_kinds(pairs), len(training_pairs(pairs, cfg.dpo_ties))
    if cfg.method == "dpo" and trained == 0:
        raise ValueError(
            f"no preference pair has a winner ({kinds}), and ties do not train "
            "(dpo_ties=false): set dpo_ties=true, or get feedback that tells the images apart"
        )
    real_w, real_scores = np.ones(len(real_x)), None  # (M,) the beta_r term's weights
    if cfg.weigh_real:
        real_scores = _real_scores(cfg, real_x, real_y, out.parent / "real_rewards.npz")
        if cfg.real_labels:
            real_scores = _calibrated(cfg, real_scores, real_y)
        real_w = shape_rewards(real_scores, real_y, real_mode(cfg), cfg.reward_threshold)
        if cfg.method == "reward" and not real_w.sum() > 0:
            raise ValueError(
                f"weigh_real: every real image weighs 0 under real_reward_mode={real_mode(cfg)} "
                "(no real image is rewarded), so no real row can be drawn; use a softer mode"
            )
    np.savez(
        out,
        images=images,
        class_ids=class_ids,
        weights=weights.astype(np.float32),
        pairs=pairs,
        real_images=real_x,
        real_class_ids=real_y,
        real_weights=real_w.astype(np.float32),
    )
    return {
        "synthetic_images": len(images),
        "pairs": len(pairs),
        "pair_kinds": kinds,
        "pairs_trained": trained if cfg.method == "dpo" else 0,
        "real_images": len(real_x),
        "mean_weight": float(np.mean(weights)) if len(weights) else 0.0,
        "mean_score": None if np.isnan(scores).all() else float(np.nanmean(scores)),
        "real_mean_score": None if real_scores is None else float(np.mean(real_scores)),
    }


def real_mode(cfg: FinetuneConfig) -> str:
    """How weigh_real shapes the real images' rewards (``real_reward_mode`` or its default)."""
    # nft: raw, not class_z. The real images are the data: one the expert accepts teaches the
    # plain loss (reward 1), one it rejects pushes away (0). Centred within each class, a class
    # the expert leaves alone (every real image passes) would get 0.5 everywhere: no gradient,
    # and that class would drift back towards the model that drew the pool.
    return cfg.real_reward_mode or ("raw" if cfg.method == "nft" else "class_norm")


def _real_scores(cfg: FinetuneConfig, real_x, real_y, cache: Path) -> np.ndarray:
    """Rewards (M,) of the real images in ``load_arrays`` order: given, or the reward model's."""
    if cfg.real_rewards:
        from pathloop.data import iter_records

        ids = [r["id"] for r in iter_records(cfg.real, cfg.real_split, columns=["id"])]
        return given_rewards(cfg.real_rewards, ids, key="real_rewards", what="real")
    return _cached_rewards(cfg, real_x, real_y, cache, source=f"{cfg.real}:{cfg.real_split}")


def calibrate_per_class(
    scores: np.ndarray, class_ids: np.ndarray, targets: dict[int, float]
) -> np.ndarray:
    """``scores`` (M,) in [0, 1] shifted in logit space, one offset per class, so that the mean of
    each class named in ``targets`` is its target (clipped to [0.01, 0.99]); other classes keep
    their scores. The order within a class is unchanged."""
    from scipy.optimize import brentq
    from scipy.special import expit, logit

    z = logit(np.clip(np.asarray(scores, dtype=np.float64), 1e-6, 1 - 1e-6))  # (M,)
    out = expit(z)
    for c, target in targets.items():
        m = class_ids == c
        if not m.any():
            continue
        p = float(np.clip(target, 0.01, 0.99))
        shift = brentq(lambda b, zc=z[m], p=p: expit(zc + b).mean() - p, -40.0, 40.0)
        out[m] = expit(z[m] + shift)
    return out


def _calibrated(cfg: FinetuneConfig, scores: np.ndarray, real_y: np.ndarray) -> np.ndarray:
    """The real images' scores (M,) shifted per class to the acceptance among the images the
    expert labelled (``real_labels``), looked up by id in the real split."""
    from pathloop.data import iter_records

    hint = "pass a table with columns id and plausible (1/0), such as a feedback export"
    table = _read_table("real_labels", cfg.real_labels, ("id", "plausible"), ("id",), hint)
    ids = [r["id"] for r in iter_records(cfg.real, cfg.real_split, columns=["id"])]
    labels = dict(zip(table["id"].to_pylist(), table["plausible"].to_pylist(), strict=True))
    given = ((k, labels.get(i)) for k, i in enumerate(ids))  # unlabelled or unjudged: skipped
    rows = [(k, float(v)) for k, v in given if v is not None and np.isfinite(v)]
    if not rows:
        raise ValueError(
            f"real_labels={cfg.real_labels} labels none of the {len(ids)} real images of "
            f"{cfg.real} (split {cfg.real_split}); {hint} of the same real images"
        )
    idx, y = np.array([k for k, _ in rows]), np.array([v for _, v in rows])
    cls = real_y[idx]
    targets = {int(c): float(y[cls == c].mean()) for c in np.unique(cls)}
    return calibrate_per_class(scores, real_y, targets)


def _scores(cfg: FinetuneConfig, images, class_ids, cols: dict, cache: Path) -> np.ndarray:
    """Reward of each synthetic image (N,): given (``rewards``), from the reward model (cached),
    NaN where the weights need none (reward_mode none or ones), else checklist scores from the
    fail_* columns of a feedback export."""
    if cfg.rewards:
        return given_rewards(cfg.rewards, cols["id"])
    if (cfg.method == "reward" and cfg.reward_mode in REWARD_FREE) or cfg.pairs:
        # no weights needed (a reward model set for weigh_real scores the real images
        # only), or the pairs are given
        return np.full(len(images), np.nan)
    if cfg.reward_model:
        return _cached_rewards(cfg, images, class_ids, cache)
    fails = [k for k in cols if k.startswith("fail_")]
    if not fails:
        raise ValueError(
            f"{cfg.synthetic} has no fail_* checklist columns and no "
            "reward_model is set; pass a feedback export or a reward model"
        )
    return 1.0 - np.mean([cols[k].astype(float) for k in fails], axis=0)  # (N,)


def _read_table(
    key: str, path: str, columns: tuple[str, ...], id_columns: tuple[str, ...], hint: str
) -> Any:
    """A CSV or Parquet table with ``columns`` (ids read as strings) for config field ``key``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pathloop import storage

    if not storage.is_file(path):
        raise FileNotFoundError(f"{key}={path}: no such file; {hint}")
    fs, inner = storage.resolve(path)
    if path.endswith(".csv"):
        opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in id_columns})
        with fs.open_input_stream(inner) as f:
            table = pacsv.read_csv(f, convert_options=opts)
    else:
        table = pq.read_table(inner, filesystem=fs)
    if missing := sorted(set(columns) - set(table.column_names)):
        raise ValueError(f"{key}={path} lacks columns {missing}; {hint}")
    return table


def given_rewards(
    path: str, ids: Sequence[str] | np.ndarray, key: str = "rewards", what: str = "synthetic"
) -> np.ndarray:
    """Rewards (N,) of the images ``ids`` from a CSV or Parquet table (id, reward); ``key`` and
    ``what`` name the config field and the images in its errors."""
    hint = f"pass a CSV or Parquet table with columns id and reward, one row per {what} image"
    table = _read_table(key, path, ("id", "reward"), ("id",), hint)
    given = dict(zip(table["id"].to_pylist(), table["reward"].to_pylist(), strict=True))
    absent = [i for i in ids if i not in given]
    if absent:
        raise ValueError(
            f"{key}={path} has no reward for {len(absent)} of the {len(ids)} {what} "
            f"images (e.g. id {absent[0]}); {hint}"
        )
    r = np.array([given[i] for i in ids], dtype=np.float64)  # (N,) in the image set's order
    if not (np.isfinite(r) & (r >= 0)).all():
        raise ValueError(f"{key}={path}: every reward must be a finite number >= 0")
    return r


def given_pairs(
    path: str, ids: Sequence[str] | np.ndarray, class_ids: np.ndarray | None = None
) -> np.ndarray:
    """Preference pairs (P, 4) as ``preference_pairs`` returns them (index a, index b, sign a,
    sign b) from a table of id_a, id_b, sign_a, sign_b over the synthetic images ``ids``."""
    hint = "pass the table `pathloop review pairs` writes, over the images of synthetic="
    cols = ("id_a", "id_b", "sign_a", "sign_b")
    table = _read_table("pairs", path, cols, ("id_a", "id_b"), hint)
    index = {str(i): k for k, i in enumerate(ids)}
    a, b = table["id_a"].to_pylist(), table["id_b"].to_pylist()
    absent = [i for i in a + b if i not in index]
    if absent:
        raise ValueError(
            f"pairs={path}: {len(absent)} image ids are not in synthetic= (e.g. {absent[0]}); "
            f"{hint}"
        )
    signs = np.array([table["sign_a"].to_pylist(), table["sign_b"].to_pylist()]).T  # (P, 2)
    if not np.isin(signs, (-1, 1)).all():
        raise ValueError(f"pairs={path}: every sign must be +1 (win) or -1 (lose)")
    idx = np.array([[index[x] for x in a], [index[x] for x in b]], dtype=np.int64).T  # (P, 2)
    if class_ids is not None and (class_ids[idx[:, 0]] != class_ids[idx[:, 1]]).any():
        raise ValueError(f"pairs={path}: a pair must hold two images of one class")
    return np.concatenate([idx, signs.astype(np.int64)], axis=1).reshape(-1, 4)


def _cached_rewards(cfg: FinetuneConfig, images, class_ids, cache: Path, source: str = ""):
    """Reward of every image, computed once per (reward model, image set: ``source`` or the
    synthetic set)."""
    import numpy as np

    from pathloop import storage

    key = f"{cfg.reward_model}|{source or storage.absolute(cfg.synthetic)}|{len(images)}"
    if cache.exists():
        z = np.load(cache)
        if str(z["key"]) == key:
            return z["rewards"]
    from pathloop.reward import load_reward_model

    rewards = np.asarray(load_reward_model(cfg.reward_model).score(images, class_ids))
    np.savez(cache, key=np.array(key), rewards=rewards)
    return rewards


def check_reward_source(cfg: FinetuneConfig) -> None:
    """Refuse a config whose synthetic images would get no weights, or two sources of them."""
    if cfg.pairs and cfg.method != "dpo":
        raise ValueError(f"pairs={cfg.pairs} are preference pairs: set method=dpo to train on them")
    if not cfg.synthetic and not (cfg.method == "reward" and cfg.reward_mode == "none"):
        raise ValueError(
            f"synthetic is unset, and method={cfg.method} with reward_mode={cfg.reward_mode} "
            "trains on synthetic images: set synthetic=<shard set or feedback.parquet>, or "
            "method=reward reward_mode=none for the real term alone"
        )
    if cfg.rewards and cfg.reward_model:
        raise ValueError(
            f"set rewards= or reward_model=, not both (got rewards={cfg.rewards}, "
            f"reward_model={cfg.reward_model}): each gives the synthetic images their rewards"
        )
    if cfg.method == "reward" and cfg.reward_mode not in REWARD_FREE:
        if not (cfg.reward_model or cfg.rewards):
            raise ValueError(
                f"method=reward with reward_mode={cfg.reward_mode} needs reward_model=<path or "
                "MLflow URI> (Eq. 3 weights each synthetic image by its reward) or "
                "rewards=<table of id, reward>; or use method=dpo with a feedback export"
            )
    if cfg.method == "nft" and cfg.reward_mode in REWARD_FREE:
        raise ValueError(
            f"method=nft with reward_mode={cfg.reward_mode}: nft moves the model toward images "
            "with reward above 0.5 and away from those below, so it needs rewards; use "
            "reward_mode=raw or class_z with reward_model= or rewards=, or method=reward"
        )
    if cfg.weigh_real and not (cfg.real and cfg.beta_r > 0):
        raise ValueError(
            "weigh_real weighs the beta_r term's real images: set real=<shard set> and beta_r > 0"
        )
    if cfg.weigh_real and not (cfg.real_rewards or cfg.reward_model):
        raise ValueError(
            "weigh_real needs the real images' rewards: real_rewards=<table of id, reward> or "
            "reward_model=<path or MLflow URI> to score them"
        )
    if cfg.real_labels and not (cfg.weigh_real and cfg.reward_model and not cfg.real_rewards):
        raise ValueError(
            "real_labels calibrates the reward model's scores of the real images: set "
            "weigh_real=true and reward_model=, without real_rewards="
        )
    if cfg.weigh_real and cfg.method == "dpo":
        raise ValueError("weigh_real works with method=reward or nft; method=dpo trains on pairs")
    if cfg.method == "reward" and cfg.reward_mode == "none" and (cfg.beta_r == 0 or not cfg.real):
        raise ValueError(
            "reward_mode=none weighs the synthetic images 0, so only the beta_r term on real "
            "images trains: set beta_r > 0 and real=<shard set>, or pick another reward_mode"
        )


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Driver: resolve the pretrained model, cache rewards or build pairs, fit, register."""
    from rich import print as rprint

    from pathloop import storage
    from pathloop.diffusion import load_checkpoint
    from pathloop.tracking import for_workers, log_metrics, resolve_model_ref

    check_reward_source(cfg)
    ckpt_dir, pre_uri = resolve_model_ref(cfg.pretrained, cfg.tracking)
    start = load_checkpoint(ckpt_dir)
    # Workers do not share the driver's cwd: every path crosses as an absolute one (or a URI).
    paths = ("synthetic", "real", "rewards", "pairs", "real_rewards", "real_labels")
    abs_ = {k: storage.absolute(v) for k in paths if (v := getattr(cfg, k))}
    cfg = updated(
        cfg,
        **abs_,
        model=ModelConfig.model_validate(start.config["model"]),
        noise=start.noise or cfg.noise,
    )
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must divide by "
            f"scaling.num_workers={cfg.scaling.num_workers}"
        )
    tags = {
        "pathloop.pretrained": pre_uri,
        "pathloop.reward_model": str(cfg.reward_model),
        "pathloop.rewards": str(cfg.rewards),
        "pathloop.reward_mode": cfg.reward_mode,
        "pathloop.weigh_real": str(cfg.weigh_real),
        "pathloop.feedback_round": str(cfg.feedback_round),
        "pathloop.method": cfg.method,
        "pathloop.feedback_fraction": str(cfg.feedback_fraction),
    }
    cfg, uri, run_id = prepare_run(cfg, "finetune", tags)
    ckpt_dir = for_workers(ckpt_dir, cfg.workdir, "pretrained_model")
    data_file = Path(cfg.workdir) / "finetune_data.npz"
    stats = _finetune_data(cfg, start.vocab, data_file)
    rprint({"config": cfg.model_dump(mode="json"), "data": stats})
    if cfg.method == "dpo":  # the pairs of each kind, and how many of them train
        counts = {f"pairs_{k}": n for k, n in stats["pair_kinds"].items()}
        log_metrics(uri, run_id, {**counts, "pairs_trained": stats["pairs_trained"]}, step=0)
    inputs = FinetuneInputs(
        cfg=cfg,
        vocab=start.vocab,
        mlflow=MlflowRun(uri=uri, run_id=run_id),
        pretrained_dir=str(ckpt_dir),
        data_file=str(data_file),
    )
    ckpt = fit(finetune_loop, inputs)
    return finish_run(cfg, uri, run_id, ckpt, {"data": stats, "lineage": tags})
