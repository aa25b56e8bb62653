"""The reward model Γφ(x, c) of Sun et al. 2023 (Eq. 2) and its job (step 2 of the method).

Γφ: backbone embedding ⊕ one-hot(c) → MLP → sigmoid, trained on synthetic images with expert
feedback plus λr × MSE on real images whose class is re-drawn at random (``RewardFit``). The
backbone is a ``classifiers.Backbone``. ``RewardConfig`` is the job's manual, ``reward_loop``
its Ray Train worker loop and ``run_reward`` its driver. The model is saved as a
self-describing directory (``model.pt`` + ``config.json`` + ``classes.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pathloop.classifiers import (
    CLASSES,
    CONFIG,
    STATE,
    Backbone,
    batched,
    dihedral,
    load_backbone,
    read_model_config,
    save_backbone,
    stratified_split,
    to_float_images,
)
from pathloop.config import (
    AdamWConfig,
    ClassifierConfig,
    Frozen,
    TrackingConfig,
    WorkersConfig,
    updated,
)
from pathloop.harness import (
    Load,
    MlflowRun,
    RankZeroLog,
    Save,
    StepsConfig,
    WorkerInputs,
    finish_run,
    fit,
    prepare_run,
    restore,
    step_until_done,
    worker_context,
)
from pathloop.vocab import Vocabulary

# Label convention, stated once: Sun et al. 2023 label an image 1 when an expert calls it
# *implausible*; pathloop's reward (and the ``plausible`` column of a feedback export) is the
# probability an expert calls it *plausible*. Use ``target_from_paper_label`` to convert.
REWARD_MEANING = "probability an expert calls the image plausible (= 1 - paper label)"


def target_from_paper_label(y_paper: Any) -> Any:
    """Paper label (1 = implausible) → pathloop reward target (1 = plausible)."""
    return 1 - y_paper


# ----------------------------------------------------------------------------- reward model


class RewardHead(nn.Module):
    """Γφ's head: embedding (B, D) ⊕ one-hot class (B, K) → MLP → sigmoid reward (B,)."""

    def __init__(
        self, embed_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim + num_classes, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, emb: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(class_ids.long(), self.num_classes).to(emb)  # (B, K)
        z = torch.cat([emb, onehot], dim=1)  # (B, D + K)
        return torch.sigmoid(self.mlp(z)).squeeze(1)  # (B,) in [0, 1]


class RewardModel(nn.Module):
    """Γφ(x, c) of Sun et al. 2023: ``REWARD_MEANING``, for image x declared as class c."""

    def __init__(
        self, backbone: Backbone, vocab: Vocabulary, hidden: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.backbone, self.vocab = backbone, vocab
        self.head = RewardHead(backbone.embed_dim, len(vocab), hidden, dropout)
        self.hidden, self.dropout = hidden, dropout
        self.meta: dict = {}  # config.json of a loaded model (job config, holdout metrics)

    def forward(self, x: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] and (B,) class ids → (B,) rewards in [0, 1]."""
        return self.head(self.backbone.embed(x), class_ids)

    def score(self, images: Any, class_ids: Any, batch_size: int = 256) -> np.ndarray:
        """Rewards (N,) of uint8 (N, H, W, 3) or float (N, 3, H, W) images for declared ids."""
        ids = torch.as_tensor(np.asarray(class_ids), dtype=torch.long).reshape(-1)  # (N,)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.vocab)):
            raise ValueError(f"class ids must be in 0..{len(self.vocab) - 1}, got {ids.tolist()}")
        x = to_float_images(images)  # (N, 3, H, W)
        device = next(self.parameters()).device
        was, out = self.training, []
        self.eval()
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                out.append(
                    self(x[i : i + batch_size].to(device), ids[i : i + batch_size].to(device))
                )
        self.train(was)
        return torch.cat(out).float().cpu().numpy() if out else np.zeros(0, np.float32)


def redraw_classes(
    true_ids: torch.Tensor, num_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real-image term of Eq. 2: each real image gets a class drawn uniformly from all K
    classes (so with probability 1/K it keeps its own); target 1 iff drawn == true, else 0."""
    drawn = torch.randint(0, num_classes, true_ids.shape, generator=generator)  # (B,)
    return drawn, (drawn == true_ids).float()  # (B,), (B,)


def take_fraction(idx: np.ndarray, targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of rows ``idx`` (the paper's 0/10/50/100 % feedback ablation);
    a non-empty label keeps at least one row when fraction > 0."""
    if fraction >= 1:
        return idx
    rng, keep = np.random.default_rng(seed + 1), []
    labels = np.asarray(targets)[idx] >= 0.5
    for lab in (False, True):
        group = rng.permutation(idx[labels == lab])
        k = 0 if fraction <= 0 or not len(group) else max(1, int(round(fraction * len(group))))
        keep.append(group[:k])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: Σ_b (n_b / N) |mean(y_b) - mean(p_b)| over equal-width bins."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    which = np.clip((p * bins).astype(int), 0, bins - 1)  # (N,) bin of each prediction
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(ece)


def auc_interval(
    p: np.ndarray, yb: np.ndarray, level: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of the AUC: plausible and implausible rows resampled separately (so
    every resample has both); each resample's AUC from its ranks (Mann-Whitney, ties halved)."""
    from scipy.stats import rankdata

    p, yb = np.asarray(p, dtype=np.float64), np.asarray(yb, dtype=bool)
    pos, neg = p[yb], p[~yb]
    if not len(pos) or not len(neg):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    a = pos[rng.integers(0, len(pos), (n_boot, len(pos)))]  # (B, P)
    b = neg[rng.integers(0, len(neg), (n_boot, len(neg)))]  # (B, N)
    ranks = rankdata(np.concatenate([a, b], axis=1), axis=1)[:, : len(pos)]  # (B, P)
    n_pos, n_neg = len(pos), len(neg)
    aucs = (ranks.sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)  # (B,)
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def reward_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """AUC with its 95 % bootstrap interval, accuracy at 0.5 and ECE (10 bins) of rewards p
    against targets y (soft allowed)."""
    from sklearn.metrics import roc_auc_score

    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    yb = y >= 0.5
    auc = float(roc_auc_score(yb, p)) if 0 < yb.sum() < len(yb) else float("nan")
    auc_lo, auc_hi = auc_interval(p, yb)
    acc = float(((p >= 0.5) == yb).mean()) if len(y) else float("nan")
    return {
        "auc": auc,
        "auc_lo": auc_lo,
        "auc_hi": auc_hi,
        "accuracy": acc,
        "ece": calibration_error(p, y) if len(y) else float("nan"),
        "n_holdout": float(len(y)),
        "holdout_plausible_rate": float(yb.mean()) if len(y) else float("nan"),
    }


# ----------------------------------------------------------------------------- reward data


def load_feedback(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, Vocabulary | None]:
    """Images (N, H, W, 3), class ids (N,), targets (N,) = ``plausible`` (soft allowed) and the
    vocabulary (from the export's metadata, if any) of a feedback.parquet or its directory.
    Rows nobody judged for plausibility (null) are dropped."""
    import pyarrow.parquet as pq

    from pathloop import storage
    from pathloop.data import load_image_table
    from pathloop.feedback import FEEDBACK_FILE

    p = str(path)  # a local path or a pyarrow.fs URI
    p = storage.join(p, FEEDBACK_FILE) if storage.is_dir(p) else p
    if not storage.is_file(p):
        raise FileNotFoundError(f"no feedback export at {p!r}; run export_round first")
    images, class_ids, cols = load_image_table(p)
    if "plausible" not in cols:
        raise ValueError(f"{p} has no 'plausible' column; expected an export_round file")
    y = np.array([np.nan if v is None else float(v) for v in cols["plausible"]])  # (N,)
    keep = ~np.isnan(y)
    fs, inner = storage.resolve(p)
    meta = pq.read_schema(inner, filesystem=fs).metadata or {}
    raw = meta.get(b"pathloop.vocabulary")
    vocab = Vocabulary.model_validate_json(raw) if raw else None
    return images[keep], class_ids[keep], y[keep].astype(np.float32), vocab


@dataclass
class RewardData:
    """What Eq. 2 trains and is measured on; uint8 (N, H, W, 3) images, int64 ids, f32 targets."""

    syn_x: np.ndarray  # synthetic images with feedback, training part
    syn_c: np.ndarray
    syn_y: np.ndarray
    test_x: np.ndarray  # held-out feedback (metrics only)
    test_c: np.ndarray
    test_y: np.ndarray
    real_x: np.ndarray  # real images with their true class (λr term)
    real_c: np.ndarray

    def save(self, path: str | Path) -> None:
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> RewardData:
        z = np.load(path, allow_pickle=False)
        return cls(**{f.name: z[f.name] for f in fields(cls)})


def split_feedback(
    images: np.ndarray,
    class_ids: np.ndarray,
    targets: np.ndarray,
    real: tuple[np.ndarray, np.ndarray],
    holdout_frac: float,
    fraction: float,
    seed: int,
) -> RewardData:
    """Seeded stratified holdout first, then a ``fraction`` of the rest: ablations at different
    fractions are measured on the same held-out images."""
    train, test = stratified_split(targets, holdout_frac, seed)
    train = take_fraction(train, targets, fraction, seed)
    return RewardData(
        images[train],
        class_ids[train],
        targets[train],
        images[test],
        class_ids[test],
        targets[test],
        real[0],
        real[1].astype(np.int64),
    )


def reward_draw(
    seed: int, step: int, batch_size: int, n_syn: int, real_c: torch.Tensor, num_classes: int
) -> dict[str, torch.Tensor]:
    """The global batch of one Eq. 2 step, each (B,): synthetic/real rows, augmentation codes,
    the re-drawn classes of the real rows and their targets. Seeded by (seed, step) so any
    number of workers slicing it by rank compute what one worker would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    b = batch_size
    d = {
        "syn": torch.randint(0, max(n_syn, 1), (b,), generator=g),
        "real": torch.randint(0, max(len(real_c), 1), (b,), generator=g),
        "syn_aug": torch.randint(0, 8, (b,), generator=g),
        "real_aug": torch.randint(0, 8, (b,), generator=g),
    }
    true = real_c[d["real"]] if len(real_c) else torch.zeros(b, dtype=torch.long)
    d["drawn"], d["real_target"] = redraw_classes(true, num_classes, g)
    return d


class RewardFit:
    """One Eq. 2 optimisation, run bare (``fit_reward``) or in a Ray worker (``wrap`` = DDP).

    Frozen backbone: embeddings of every image (× 8 flips/turns when augmenting) are computed
    once and only the head trains. ``finetune_backbone``: images go through the whole model.
    Synthetic and real rows go through one forward call (DDP allows one per backward).
    """

    def __init__(
        self,
        model: RewardModel,
        data: RewardData,
        *,
        lr: float,
        lambda_r: float,
        batch_size: int,
        seed: int,
        finetune_backbone: bool = False,
        augment: bool = True,
        weight_decay: float = 0.0,
        device: Any = "cpu",
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        if len(data.syn_x) == 0 and (lambda_r <= 0 or len(data.real_x) == 0):
            raise ValueError(
                "nothing to learn: no feedback rows (fraction=0?) and no real term "
                "(lambda_r=0 or no real images)"
            )
        self.model, self.data, self.device = model.to(device), data, torch.device(device)
        self.lambda_r, self.batch_size, self.seed = lambda_r, batch_size, seed
        self.finetune, self.augment = finetune_backbone, augment
        model.backbone.requires_grad_(finetune_backbone)
        model.backbone.train(finetune_backbone)  # a frozen backbone keeps its BatchNorm stats
        trainable = model if finetune_backbone else model.head
        self.syn_bank, self.real_bank = self._bank(data.syn_x), self._bank(data.real_x)
        self.syn_c, self.syn_y = torch.from_numpy(data.syn_c).long(), torch.from_numpy(data.syn_y)
        self.real_c = torch.from_numpy(data.real_c).long()
        self.net = wrap(trainable) if wrap else trainable
        params = [p for p in trainable.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def _bank(self, images: np.ndarray) -> torch.Tensor:
        """What training rows index: images (N, 3, H, W), or embeddings (V, N, D) when frozen."""
        x = to_float_images(images) if len(images) else torch.zeros(0, 3, 1, 1)
        if self.finetune:
            return x
        variants = range(8) if self.augment else range(1)
        embed = self.model.backbone.embed
        if not len(x):
            return torch.zeros(len(variants), 0, self.model.backbone.embed_dim)
        return torch.stack(
            [batched(embed, dihedral(x, torch.full((len(x),), k)), self.device) for k in variants]
        )  # (V, N, D)

    def _inputs(self, bank: torch.Tensor, idx: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if self.finetune:
            x = bank[idx]  # (b, 3, H, W)
            return dihedral(x, codes) if self.augment else x
        return bank[codes if self.augment else torch.zeros_like(codes), idx]  # (b, D)

    def loss(self, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Eq. 2 on this rank's slice of the step's global batch: a scalar."""
        from pathloop.losses import reward_mse_loss

        d = reward_draw(
            self.seed, step, self.batch_size, len(self.syn_c), self.real_c, len(self.model.vocab)
        )
        sl = slice(rank * (self.batch_size // world), (rank + 1) * (self.batch_size // world))
        d = {k: v[sl] for k, v in d.items()}
        use_syn = len(self.syn_c) > 0
        use_real = self.lambda_r > 0 and len(self.real_c) > 0
        terms = []  # (bank, rows, augmentation codes, declared classes) of each term of Eq. 2
        if use_syn:
            terms.append((self.syn_bank, d["syn"], d["syn_aug"], self.syn_c[d["syn"]]))
        if use_real:
            terms.append((self.real_bank, d["real"], d["real_aug"], d["drawn"]))
        x = torch.cat([self._inputs(bank, i, a) for bank, i, a, _ in terms]).to(self.device)
        c = torch.cat([cls for *_, cls in terms]).to(self.device)
        pred = self.net(x, c)  # (b_syn + b_real,): one forward per backward, as DDP wants
        if not use_syn:  # fraction 0: only the real-image term of Eq. 2 remains
            return self.lambda_r * reward_mse_loss(pred, d["real_target"])
        b = len(d["syn"])
        pred_real, real_target = (pred[b:], d["real_target"]) if use_real else (None, None)
        # Eq. 2, Sun et al. 2023: E_syn[(r - y)^2] + lambda_r E_real[(r - 1[c' = c])^2]
        return reward_mse_loss(
            pred[:b], self.syn_y[d["syn"]], pred_real, real_target, self.lambda_r
        )

    def step(self, step: int, rank: int = 0, world: int = 1) -> float:
        """One optimizer step; returns this rank's loss."""
        loss = self.loss(step, rank, world)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def evaluate(self) -> dict[str, float]:
        """AUC, accuracy and ECE on the held-out feedback (rank 0 calls this)."""
        if not len(self.data.test_x):
            return reward_metrics(np.zeros(0), np.zeros(0))
        p = self.model.score(self.data.test_x, self.data.test_c)
        self.model.backbone.train(self.finetune)  # score() switched everything to eval and back
        return reward_metrics(p, self.data.test_y)


def fit_reward(
    model: RewardModel,
    data: RewardData,
    steps: int,
    *,
    lr: float = 3e-3,
    lambda_r: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    finetune_backbone: bool = False,
    augment: bool = True,
) -> dict[str, float]:
    """Train Γφ in this process (no Ray) and return its held-out metrics."""
    fitter = RewardFit(
        model,
        data,
        lr=lr,
        lambda_r=lambda_r,
        batch_size=batch_size,
        seed=seed,
        finetune_backbone=finetune_backbone,
        augment=augment,
    )
    losses = [fitter.step(s) for s in range(steps)]
    return {"loss": float(np.mean(losses[-20:])), **fitter.evaluate()}


def save_reward_model(
    out: str | Path,
    model: RewardModel,
    *,
    step: int,
    config: dict,
    metrics: dict,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """A self-describing reward model dir: ``backbone/`` (a backbone dir), ``head.pt``,
    ``config.json`` (job config, holdout metrics, what the score means), ``classes.json``,
    ``state.json`` (step) and, for resuming, ``optimizer.pt``."""
    out = Path(out)
    save_backbone(out / "backbone", model.backbone, model.backbone.vocab or model.vocab)
    torch.save(model.head.state_dict(), out / "head.pt")
    meta = {
        "kind": "reward_model",
        "score": REWARD_MEANING,
        "hidden": model.hidden,
        "dropout": model.dropout,
        "num_classes": len(model.vocab),
        "job": config,
        "metrics": metrics,
    }
    (out / CONFIG).write_text(json.dumps(meta, indent=2, default=str))
    model.vocab.save(out / CLASSES)
    (out / STATE).write_text(json.dumps({"step": step}))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), out / "optimizer.pt")
    return out


def load_reward_model(
    ref: str | Path, tracking_uri: str | None = None, device: str | torch.device = "cpu"
) -> RewardModel:
    """Load Γφ (eval mode) from a directory, a job's ``result.json`` or an MLflow model URI."""
    from pathloop.tracking import resolve_model

    path = resolve_model(ref, tracking_uri)
    meta = read_model_config(path, "reward_model")
    model = RewardModel(
        load_backbone(path / "backbone"),
        Vocabulary.load(path / CLASSES),
        hidden=meta["hidden"],
        dropout=meta.get("dropout", 0.1),
    )
    model.head.load_state_dict(torch.load(path / "head.pt", map_location="cpu", weights_only=True))
    model.meta = meta
    return model.to(device).eval()


# ----------------------------------------------------------------------------- config


class RewardTrainConfig(StepsConfig):
    """The reward job's step loop."""

    steps: int = Field(500, gt=0, description="Optimizer steps.")
    batch_size: int = Field(
        32,
        gt=0,
        description="Global batch of feedback rows (plus as many real rows); must divide by "
        "num_workers.",
    )
    seed: int = Field(0, description="Seed of the holdout split, fraction, init and draws.")
    checkpoint_every: int = Field(
        250, gt=0, description="Steps between checkpoints; each also measures the held-out metrics."
    )


class RewardConfig(Frozen):
    """Step 2 of Sun et al. 2023: the reward model Γφ(x, c) learns expert feedback (Eq. 2)."""

    workdir: str = Field("runs/reward", description="Checkpoints, Ray results, result.json.")
    name: str = Field("reward", description="Run name (Ray run dir and MLflow run).")
    resume: bool = Field(False, description="Continue from the latest checkpoint in workdir.")
    max_failures: int = Field(2, ge=-1, description="Worker failures Ray Train recovers from.")
    feedback: str = Field(
        "runs/feedback/feedback.parquet",
        description="export_round's feedback.parquet, or the folder holding it.",
    )
    real_shards: str = Field(
        "runs/demo/data",
        description=(
            "Real shard set: the λr term and, when backbone is None, the backbone's training data."
        ),
    )
    real_split: str = Field("train", description="Split of real_shards used.")
    backbone: str | None = Field(
        None,
        description=(
            "Trained backbone (dir, result.json or MLflow URI); None = train one on real_shards."
        ),
    )
    backbone_train: ClassifierConfig = Field(
        default_factory=ClassifierConfig,
        description="When backbone is None: the cell-type classifier trained on real_shards.",
    )
    finetune_backbone: bool = Field(
        False,
        description=("Train the backbone with the head; false = frozen, embeddings computed once."),
    )
    hidden: int = Field(256, gt=0, description="Width of the head's MLP.")
    lambda_r: float = Field(1.0, ge=0, description="Weight of the real-image term of Eq. 2.")
    holdout_frac: float = Field(
        0.2,
        ge=0,
        lt=1,
        description=("Feedback held out for AUC/accuracy/ECE (seeded, stratified by label)."),
    )
    fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        description=(
            "Fraction of the non-held-out feedback used (the paper's 0/10/50/100 % ablation); "
            "0 = real-image term only. The held-out set does not change with it."
        ),
    )
    augment: bool = Field(
        True,
        description=("Random flips/90° turns; frozen backbone: 8 cached embeddings per image."),
    )
    optim: AdamWConfig = Field(
        default_factory=lambda: AdamWConfig(lr=3e-3),
        description="AdamW of what trains: the head, or the whole model with finetune_backbone.",
    )
    train: RewardTrainConfig = Field(default_factory=RewardTrainConfig)
    scaling: WorkersConfig = Field(default_factory=WorkersConfig)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-reward")
    )


class RewardInputs(WorkerInputs):
    """What ``run_reward`` hands ``reward_loop``."""

    cfg: RewardConfig = Field(description="The job's config, paths absolute.")
    backbone_dir: str = Field(description="Local dir of the trained backbone.")
    data_file: str = Field(description="The driver's .npz of the split feedback (``RewardData``).")


# ----------------------------------------------------------------------------- Ray Train loop


def reward_loop(config: dict) -> None:
    """Ray Train worker loop for the reward model. A feedback round is small (hundreds to a few
    thousand images), so each worker loads the driver's .npz into memory instead of streaming
    it through Ray Data; rows come from the seeded global draw, sliced by rank."""
    inputs = RewardInputs.model_validate(config)
    import ray.train.torch

    cfg = inputs.cfg
    rank, world, device = worker_context(cfg)
    torch.manual_seed(cfg.train.seed)  # the same head init on every rank
    model = RewardModel(load_backbone(inputs.backbone_dir), inputs.vocab, hidden=cfg.hidden)
    fitter = RewardFit(
        model,
        RewardData.load(inputs.data_file),
        lr=cfg.optim.lr,
        lambda_r=cfg.lambda_r,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        finetune_backbone=cfg.finetune_backbone,
        augment=cfg.augment,
        weight_decay=cfg.optim.weight_decay,
        device=device,
        wrap=ray.train.torch.prepare_model,
    )
    save, load = reward_checkpoints(cfg, fitter)
    step_until_done(
        cfg,
        restore(load),
        lambda s, _batch: (fitter.step(s, rank, world), {}),
        RankZeroLog(cfg, inputs.mlflow, rank),
        save,
        measure=fitter.evaluate,  # held-out AUC, accuracy at 0.5, ECE at each checkpoint
    )


def reward_checkpoints(cfg: RewardConfig, fitter: RewardFit) -> tuple[Save, Load]:
    """``(save, load)`` of the reward job's checkpoint: a reward model dir (with the metrics
    reported with it) plus the optimizer; ``load`` restores head, backbone and optimizer."""

    def save(tmp: str, step: int, metrics: dict) -> None:
        config = cfg.model_dump(mode="json")
        save_reward_model(
            tmp, fitter.model, step=step, config=config, metrics=metrics, optimizer=fitter.opt
        )

    def load(d: str) -> int:
        saved = load_reward_model(d)
        fitter.model.head.load_state_dict(saved.head.state_dict())
        fitter.model.backbone.load_state_dict(saved.backbone.state_dict())
        if (Path(d) / "optimizer.pt").exists():
            fitter.opt.load_state_dict(
                torch.load(Path(d) / "optimizer.pt", map_location="cpu", weights_only=True)
            )
        return int(json.loads((Path(d) / STATE).read_text())["step"])

    return save, load


# ----------------------------------------------------------------------------- driver


def _reward_arithmetic(cfg: RewardConfig, data: Any, n_feedback: int) -> dict[str, Any]:
    """State the numbers before the loop and check that they divide."""
    w, b, steps = cfg.scaling.num_workers, cfg.train.batch_size, cfg.train.steps
    if b % w:
        raise ValueError(
            f"train.batch_size={b} must divide by scaling.num_workers={w}; "
            f"use e.g. train.batch_size={b // w * w or w}"
        )
    n_syn = len(data.syn_x)
    return {
        "feedback_rows": n_feedback,
        "held_out": len(data.test_x),
        "feedback_used": n_syn,
        "fraction": cfg.fraction,
        "real_images": len(data.real_x),
        "workers": w,
        "global_batch": f"{b} feedback + {b} real",
        "per_worker_batch": b // w,
        "steps": steps,
        "epochs_over_feedback": round(steps * b / n_syn, 2) if n_syn else 0,
    }


def _reward_backbone(cfg: RewardConfig, uri: str, run_id: str) -> str:
    """The backbone dir: resolve ``cfg.backbone``, or train one on the real shards (logged as
    this run's ``backbone`` artifact; reused when resuming)."""
    from pathloop import tracking
    from pathloop.classifiers import train_backbone
    from pathloop.tracking import resolve_model_ref

    if cfg.backbone:
        local = resolve_model_ref(cfg.backbone, cfg.tracking)[0]
        return str(tracking.for_workers(local, cfg.workdir, "backbone_model"))
    out = Path(cfg.workdir) / "backbone"
    if cfg.resume and (out / "config.json").exists():
        return str(out)
    m = train_backbone(cfg.real_shards, out, cfg.backbone_train, split=cfg.real_split)
    tracking.log_metrics(uri, run_id, {f"backbone_{k}": v for k, v in m.items() if k != "path"}, 0)
    tracking.log_artifact(uri, run_id, out, "backbone")
    return str(out)


def run_reward(cfg: RewardConfig) -> dict[str, Any]:
    """Driver: load and split the feedback, get a backbone, fit Γφ on Ray Train, log the
    held-out metrics, register the model; result.json has its URI, AUC, accuracy and ECE."""
    from rich import print as rprint

    from pathloop import storage
    from pathloop.data import load_arrays, read_vocab

    # Workers do not share the driver's cwd: every path crosses as an absolute one (or a URI).
    local = {
        k: storage.absolute(v)
        for k in ("feedback", "real_shards", "backbone")
        if (v := getattr(cfg, k))
    }
    cfg = updated(cfg, **local)
    vocab = read_vocab(cfg.real_shards)
    images, class_ids, targets, fb_vocab = load_feedback(cfg.feedback)
    if fb_vocab is not None and fb_vocab.names != vocab.names:
        raise ValueError(
            f"feedback classes {fb_vocab.names} differ from {cfg.real_shards}'s "
            f"{vocab.names}; pair a feedback round with the shards it came from"
        )
    real = load_arrays(cfg.real_shards, cfg.real_split)
    if len(real[0]) and real[0].shape[1:] != images.shape[1:]:
        raise ValueError(
            f"feedback images are {images.shape[1:3]} px but real images "
            f"{real[0].shape[1:3]} px; use real shards of the sampled size"
        )
    data = split_feedback(
        images, class_ids, targets, real, cfg.holdout_frac, cfg.fraction, cfg.train.seed
    )
    arith = _reward_arithmetic(cfg, data, len(images))
    tags = {
        "pathloop.feedback": cfg.feedback,
        "pathloop.real_shards": cfg.real_shards,
        "pathloop.feedback_fraction": str(cfg.fraction),
    }
    cfg, uri, run_id = prepare_run(cfg, "reward", tags)
    backbone_dir = _reward_backbone(cfg, uri, run_id)
    data_file = Path(cfg.workdir) / "reward_data.npz"
    data.save(data_file)
    rprint({"config": cfg.model_dump(mode="json"), "arithmetic": arith})
    inputs = RewardInputs(
        cfg=cfg,
        vocab=vocab,
        mlflow=MlflowRun(uri=uri, run_id=run_id),
        backbone_dir=backbone_dir,
        data_file=str(data_file),
    )
    ckpt = fit(reward_loop, inputs)
    metrics = json.loads((ckpt / "config.json").read_text())["metrics"]
    keys = ("auc", "auc_lo", "auc_hi", "accuracy", "ece")
    held_out = {k: metrics[k] for k in keys if k in metrics}
    return finish_run(
        cfg, uri, run_id, ckpt, {**held_out, "backbone": backbone_dir, "arithmetic": arith}
    )
