"""Finetuning with feedback (step 3 of Sun et al. 2023): the reward-weighted loss of Eq. 3, or
MAGIC's preference route (Diffusion-DPO on pairs built from checklist scores), each plus
beta_r times the plain loss on real images.

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
    """Step 3 of Sun et al. 2023 (method=reward) or MAGIC's preference route (method=dpo)."""

    workdir: str = Field("runs/finetune", description="Checkpoints, Ray results, result.json.")
    name: str = Field("finetune", description="Run name (Ray run dir and MLflow run).")
    resume: bool = Field(False, description="Continue from the latest checkpoint in workdir.")
    max_failures: int = Field(2, ge=-1, description="Worker failures Ray Train recovers from.")
    method: Literal["reward", "dpo"] = Field("reward", description="Eq. 3 or Diffusion-DPO.")
    pretrained: str = Field("runs/pretrain/result.json", description="Model to start from.")
    synthetic: str = Field(
        "runs/samples",
        description=(
            "Synthetic images: a shard set or a feedback.parquet (dpo needs its fail_* columns "
            "unless a reward model scores them)."
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
    reward_mode: Literal["raw", "threshold", "class_norm", "none", "ones"] = Field(
        "raw",
        description=(
            "raw r; threshold: 1[r >= reward_threshold]; class_norm: r / mean_class(r); "
            "none: weights 0, the control arm (only the beta_r real term trains, so what the "
            "feedback adds is the difference to a run with it); ones: weights 1, self-training "
            "on the synthetic images without feedback. none and ones need no rewards."
        ),
    )
    reward_threshold: float = Field(0.5, ge=0, le=1, description="For reward_mode=threshold.")
    dpo_beta: float = Field(
        100.0, gt=0, description="Diffusion-DPO beta (errors are per-pixel MSE)."
    )
    dpo_bar: float = Field(1.0, ge=0, le=1, description="MAGIC's bar on checklist scores.")
    feedback_round: str | None = Field(None, description="Lineage: the feedback round id.")
    feedback_fraction: float | None = Field(None, description="Lineage: fraction of feedback used.")
    p_uncond: float = Field(0.1, ge=0, le=1, description="Class dropout kept during finetuning.")
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
    if mode == "class_norm":  # every class keeps the same total weight, whatever its reward level
        out = r.copy()
        for c in np.unique(class_ids):
            m = class_ids == c
            out[m] = r[m] / max(r[m].mean(), 1e-6)
        return out
    return r


def preference_pairs(
    scores: Sequence[float] | np.ndarray,
    class_ids: Sequence[int] | np.ndarray,
    bar: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """MAGIC's rule (Wang et al. 2025): pair images of the same class at random, then label them.

    Both scores below ``bar`` → both lose; a tie at or above the bar → both win; otherwise the
    higher score wins and the other loses. ``scores`` are checklist scores in [0, 1] (fraction of
    criteria passed, from the MLLM or the judge). Returns an int array (P, 4): index a, index b,
    sign a, sign b (+1 win, -1 lose), ready for ``losses.preference_loss``. An odd image out of a
    class is left unpaired.
    """
    s = np.asarray(scores, dtype=float)
    c = np.asarray(class_ids)
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, int, int, int]] = []
    for cls in np.unique(c):
        idx = rng.permutation(np.flatnonzero(c == cls))
        for a, b in zip(idx[0::2], idx[1::2], strict=False):
            if s[a] < bar and s[b] < bar:
                sa = sb = -1
            elif s[a] == s[b]:
                sa = sb = 1
            else:
                sa, sb = (1, -1) if s[a] > s[b] else (-1, 1)
            rows.append((int(a), int(b), sa, sb))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


# ----------------------------------------------------------------------------- the loss of one step


def _finetune_batch(cfg: FinetuneConfig, step: int, n_syn: int, n_real: int, shape, rank, world):
    """This rank's slice of the step's global draw: synthetic/real indices, noise, t, dropout."""
    import torch

    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    b = cfg.train.batch_size
    pick = torch.randint(0, n_syn, (b,), generator=g)  # (B,) synthetic rows (or pairs)
    pick_real = torch.randint(0, max(n_real, 1), (b,), generator=g)  # (B,)
    k = 2 if cfg.method == "dpo" else 1  # a pair needs noise for both images
    noise = torch.randn((b, k, *shape), generator=g)  # (B, k, C, H, W)
    noise_real = torch.randn((b, *shape), generator=g)  # (B, C, H, W)
    t = torch.randint(0, cfg.noise.num_train_timesteps, (b, 2), generator=g)  # (B, 2)
    drop = torch.rand(b, generator=g) < cfg.p_uncond
    drop_real = torch.rand(b, generator=g) < cfg.p_uncond
    sl = slice(rank * (b // world), (rank + 1) * (b // world))
    return pick[sl], pick_real[sl], noise[sl], noise_real[sl], t[sl], drop[sl], drop_real[sl]


def _to_x(images: Any, idx: Any) -> Any:
    """uint8 (N, H, W, 3) rows → float (b, C, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1


def finetune_loss(cfg, st, ref, data, step: int, rank: int, world: int):
    """Eq. 3 (reward) or the preference loss (dpo) for this rank's slice, plus beta_r * real."""
    import torch

    from pathloop.diffusion import null_class
    from pathloop.losses import diffusion_loss, preference_loss, reward_weighted_loss

    syn, cls, w = data["images"], data["class_ids"], data["weights"]
    n_syn = len(data["pairs"]) if cfg.method == "dpo" else len(syn)
    shape = (3, syn.shape[1], syn.shape[2])
    pick, pick_real, noise, noise_real, t, drop, drop_real = _finetune_batch(
        cfg, step, n_syn, len(data["real_images"]), shape, rank, world
    )
    null, dev = null_class(st.raw), st.device
    noise, noise_real = noise.to(dev), noise_real.to(dev)  # drawn on the CPU for every rank alike

    def err(model, idx, k):  # per-sample denoising error of image set idx with noise k: (b,)
        y = torch.where(drop, null, torch.from_numpy(cls[idx.numpy()]))
        x0 = _to_x(syn, idx).to(dev)
        return diffusion_loss(model, st.scheduler, x0, y, noise=noise[:, k], timesteps=t[:, k])

    if cfg.method == "reward":
        l_syn = err(st.model, pick, 0)  # (b,)
        r = torch.from_numpy(w[pick.numpy()]).float()  # (b,) cached, shaped rewards
    else:
        p = torch.from_numpy(data["pairs"][pick.numpy()])  # (b, 4): a, b, sign a, sign b
        ea, eb = err(st.model, p[:, 0], 0), err(st.model, p[:, 1], 1)
        with torch.no_grad():
            ra, rb = err(ref, p[:, 0], 0), err(ref, p[:, 1], 1)
        l_pref = preference_loss(ea, eb, ra, rb, p[:, 2], p[:, 3], cfg.dpo_beta).mean()
    l_real = None
    if cfg.beta_r > 0 and len(data["real_images"]):
        # Class dropout on the real term too: without it the null class (CFG's unconditional
        # branch) learns only from reward-weighted synthetic rows and goes stale while the
        # conditional branch moves, and guidance then extrapolates the mismatch.
        y = torch.where(
            drop_real, null, torch.from_numpy(data["real_class_ids"][pick_real.numpy()])
        )
        l_real = diffusion_loss(
            st.model,
            st.scheduler,
            _to_x(data["real_images"], pick_real).to(dev),
            y,
            noise=noise_real,
            timesteps=t[:, 0],
        )  # (b,)
    if cfg.method == "reward":
        return reward_weighted_loss(l_syn, r, l_real, cfg.beta_r)  # Eq. 3, Sun et al. 2023
    return l_pref + (cfg.beta_r * l_real.mean() if l_real is not None else 0.0)


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

    from pathloop.diffusion import load_checkpoint

    cfg = inputs.cfg
    rank, world, device = worker_context(cfg)
    start = load_checkpoint(inputs.pretrained_dir)  # EMA weights of the pretrained model
    ref = copy.deepcopy(start.unet).eval().requires_grad_(False) if cfg.method == "dpo" else None
    ref = ref.to(device) if ref is not None else None  # the frozen reference beside the model
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

    images, class_ids, cols = load_image_table(cfg.synthetic)
    scores = _scores(cfg, images, class_ids, cols, out.parent / "rewards.npz")  # (N,)
    weights = shape_rewards(scores, class_ids, cfg.reward_mode, cfg.reward_threshold)
    pairs = (
        preference_pairs(scores, class_ids, cfg.dpo_bar, cfg.train.seed)
        if cfg.method == "dpo"
        else np.zeros((0, 4), np.int64)
    )
    if cfg.method == "dpo" and len(pairs) == 0:
        raise ValueError("no preference pairs: each class needs at least 2 synthetic images")
    real_x, real_y = (
        load_arrays(cfg.real, split=cfg.real_split)
        if cfg.real
        else (np.zeros((0, *images.shape[1:]), np.uint8), np.zeros(0, np.int64))
    )
    np.savez(
        out,
        images=images,
        class_ids=class_ids,
        weights=weights.astype(np.float32),
        pairs=pairs,
        real_images=real_x,
        real_class_ids=real_y,
    )
    return {
        "synthetic_images": len(images),
        "pairs": len(pairs),
        "real_images": len(real_x),
        "mean_weight": float(np.mean(weights)),
        "mean_score": None if np.isnan(scores).all() else float(np.nanmean(scores)),
    }


def _scores(cfg: FinetuneConfig, images, class_ids, cols: dict, cache: Path) -> np.ndarray:
    """Reward of each synthetic image (N,): given (``rewards``), from the reward model (cached),
    NaN where the weights need none (reward_mode none or ones), else checklist scores from the
    fail_* columns of a feedback export."""
    if cfg.rewards:
        return given_rewards(cfg.rewards, cols["id"])
    if cfg.reward_model:
        return _cached_rewards(cfg, images, class_ids, cache)
    if cfg.method == "reward" and cfg.reward_mode in REWARD_FREE:
        return np.full(len(images), np.nan)
    fails = [k for k in cols if k.startswith("fail_")]
    if not fails:
        raise ValueError(
            f"{cfg.synthetic} has no fail_* checklist columns and no "
            "reward_model is set; pass a feedback export or a reward model"
        )
    return 1.0 - np.mean([cols[k].astype(float) for k in fails], axis=0)  # (N,)


def given_rewards(path: str, ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Rewards (N,) of the synthetic images ``ids`` from a CSV or Parquet table (id, reward)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pathloop import storage

    hint = "pass a CSV or Parquet table with columns id and reward, one row per synthetic image"
    if not storage.is_file(path):
        raise FileNotFoundError(f"rewards={path}: no such file; {hint}")
    fs, inner = storage.resolve(path)
    if path.endswith(".csv"):
        opts = pacsv.ConvertOptions(column_types={"id": pa.string()})
        with fs.open_input_stream(inner) as f:
            table = pacsv.read_csv(f, convert_options=opts)
    else:
        table = pq.read_table(inner, filesystem=fs)
    if missing := sorted({"id", "reward"} - set(table.column_names)):
        raise ValueError(f"rewards={path} lacks columns {missing}; {hint}")
    given = dict(zip(table["id"].to_pylist(), table["reward"].to_pylist(), strict=True))
    absent = [i for i in ids if i not in given]
    if absent:
        raise ValueError(
            f"rewards={path} has no reward for {len(absent)} of the {len(ids)} synthetic "
            f"images (e.g. id {absent[0]}); {hint}"
        )
    r = np.array([given[i] for i in ids], dtype=np.float64)  # (N,) in the synthetic set's order
    if not (np.isfinite(r) & (r >= 0)).all():
        raise ValueError(f"rewards={path}: every reward must be a finite number >= 0")
    return r


def _cached_rewards(cfg: FinetuneConfig, images, class_ids, cache: Path):
    """Reward of every synthetic image, computed once per (reward model, synthetic set)."""
    import numpy as np

    from pathloop import storage

    key = f"{cfg.reward_model}|{storage.absolute(cfg.synthetic)}|{len(images)}"
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
    from pathloop.tracking import resolve_model_ref

    check_reward_source(cfg)
    ckpt_dir, pre_uri = resolve_model_ref(cfg.pretrained, cfg.tracking)
    start = load_checkpoint(ckpt_dir)
    # Workers do not share the driver's cwd: every path crosses as an absolute one (or a URI).
    paths = ("synthetic", "real", "rewards")
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
        "pathloop.feedback_round": str(cfg.feedback_round),
        "pathloop.method": cfg.method,
        "pathloop.feedback_fraction": str(cfg.feedback_fraction),
    }
    cfg, uri, run_id = prepare_run(cfg, "finetune", tags)
    data_file = Path(cfg.workdir) / "finetune_data.npz"
    stats = _finetune_data(cfg, start.vocab, data_file)
    rprint({"config": cfg.model_dump(mode="json"), "data": stats})
    inputs = FinetuneInputs(
        cfg=cfg,
        vocab=start.vocab,
        mlflow=MlflowRun(uri=uri, run_id=run_id),
        pretrained_dir=str(ckpt_dir),
        data_file=str(data_file),
    )
    ckpt = fit(finetune_loop, inputs)
    return finish_run(cfg, uri, run_id, ckpt, {"data": stats, "lineage": tags})
