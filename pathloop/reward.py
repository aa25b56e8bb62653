"""Backbone, reward model (Eq. 2), subtype classifier and noise-aware guidance classifier.

Four small models, all built on one timm CNN wrapper (``Backbone``) and all saved as
self-describing directories (``model.pt`` + ``config.json`` + ``classes.json``):

* **backbone**: a cell-type classifier trained on the *real* (or phantom) training split; its
  pooled embedding feeds the reward model. It is deliberately separate from any evaluation
  classifier (``metrics.py``): the backbone shapes the reward that trains the diffusion model,
  and a model must not grade its own teacher.
* **reward model** Γφ(x, c) of Sun et al. 2023 (Eq. 2): backbone embedding ⊕ one-hot(c) → MLP →
  sigmoid. Trained on synthetic images with expert feedback plus λr × MSE on real images whose
  class is re-drawn at random (``RewardFit``; the Ray loop lives in ``loops.py``).
* **subtype classifier** Γρ(x): band vs segmented (a new concept inside one class); exposes a
  differentiable ``subtype_log_prob`` so finetuning can add its loss.
* **guidance classifier** p(c | x_t, t) (Dhariwal & Nichol 2021): the paper's "automatic
  feedback" baseline; ``guidance_fn`` plugs it into ``diffusion.sample``.

Images enter as uint8 (N, H, W, 3) arrays or float (N, 3, H, W) tensors in [-1, 1]. Nothing is
ever downloaded: timm models are built with ``pretrained=False``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pathloop.config import Frozen, NoiseConfig
from pathloop.vocab import ClassInfo, Vocabulary

# Label convention, stated once: Sun et al. 2023 label an image 1 when an expert calls it
# *implausible*; pathloop's reward (and the ``plausible`` column of a feedback export) is the
# probability an expert calls it *plausible*. Use ``target_from_paper_label`` to convert.
REWARD_MEANING = "probability an expert calls the image plausible (= 1 - paper label)"

# Backbone presets; any other timm model name is accepted as is (never with hub weights).
BACKBONE_PRESETS: dict[str, str] = {
    "tiny": "test_resnet",  # timm's 0.4M-param ResNet: ~95 % on 32 px phantoms in 150 CPU steps
    "paper": "resnext50_32x4d",  # the paper's reward backbone
}

WEIGHTS, CONFIG, CLASSES, STATE = "model.pt", "config.json", "classes.json", "state.json"


def target_from_paper_label(y_paper: Any) -> Any:
    """Paper label (1 = implausible) → pathloop reward target (1 = plausible)."""
    return 1 - y_paper


# ----------------------------------------------------------------------------- backbone


class BackboneConfig(Frozen):
    """A timm CNN and how to train it as a classifier (backbone, subtype, guidance)."""

    name: str = Field("tiny", description="Preset (tiny, paper) or any timm model name.")
    in_px: int | None = Field(
        None, gt=0, description="Side the network sees; inputs are resized to it. None = data's."
    )
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(32, gt=0, description="Images per step.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    augment: bool = Field(True, description="Random flips and 90° turns (cells have no up).")
    seed: int = Field(0, description="Seed of init, batches and augmentation.")


def timm_name(name: str) -> str:
    """The timm model behind a preset or a timm name; an unknown one lists the valid choices."""
    import timm

    resolved = BACKBONE_PRESETS.get(name, name)
    if not timm.is_model(resolved):
        raise ValueError(
            f"unknown backbone {name!r}; use a preset ({', '.join(BACKBONE_PRESETS)}) or a timm "
            "model name (timm.list_models())"
        )
    return resolved


class Backbone(nn.Module):
    """A timm CNN used two ways: ``forward`` gives class logits, ``embed`` the pooled features."""

    def __init__(self, net: nn.Module, name: str, in_px: int, in_chans: int = 3) -> None:
        super().__init__()
        self.net, self.name, self.in_px, self.in_chans = net, name, in_px, in_chans
        self.vocab: Vocabulary | None = None  # set when loaded from a directory

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.net, "head_hidden_size", None) or self.net.num_features)

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_px or x.shape[-2] != self.in_px:
            x = F.interpolate(x, size=(self.in_px, self.in_px), mode="bilinear", antialias=True)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] → (B, D) pooled pre-logit features."""
        feats = self.net.forward_features(self._fit(x))  # (B, D', h, w)
        return self.net.forward_head(feats, pre_logits=True)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] → (B, num_classes) logits."""
        return self.net(self._fit(x))


def build_backbone(name: str, num_classes: int, in_px: int, in_chans: int = 3) -> Backbone:
    """A freshly initialised timm model (``pretrained=False``: no hub weights, ever)."""
    import timm

    resolved = timm_name(name)
    net = timm.create_model(resolved, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    return Backbone(net, resolved, in_px, in_chans)


def _build_args(bb: Backbone) -> dict[str, Any]:
    return {
        "name": bb.name,
        "num_classes": bb.num_classes,
        "in_px": bb.in_px,
        "in_chans": bb.in_chans,
    }


def save_backbone(
    out: str | Path,
    bb: Backbone,
    vocab: Vocabulary,
    kind: str = "backbone",
    extra: dict | None = None,
) -> Path:
    """Write ``model.pt`` (timm state dict), ``config.json`` (build args, ``extra``) and
    ``classes.json`` (what logit i means) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(bb.net.state_dict(), out / WEIGHTS)
    config = {"kind": kind, "build": _build_args(bb), **(extra or {})}
    (out / CONFIG).write_text(json.dumps(config, indent=2, default=str))
    vocab.save(out / CLASSES)
    return out


def _mark_standalone(out: str | Path, steps: int) -> None:
    """``state.json`` marks a directory as a checkpoint for ``tracking.resolve_model`` (only on
    standalone dirs: a reward model's ``backbone/`` must not look like a second checkpoint)."""
    (Path(out) / STATE).write_text(json.dumps({"step": steps}))


def _read_config(path: str | Path, kind: str) -> dict:
    """config.json of a model directory, checked to be of ``kind``."""
    p = Path(path)
    if not (p / CONFIG).is_file():
        raise FileNotFoundError(f"{str(p)!r} is not a pathloop model directory (no {CONFIG})")
    config = json.loads((p / CONFIG).read_text())
    if config.get("kind") != kind:
        raise ValueError(f"{str(p)!r} holds a {config.get('kind')!r}, expected a {kind!r}")
    return config


def load_backbone(path: str | Path, kind: str = "backbone") -> Backbone:
    """Load a directory written by ``save_backbone`` (eval mode, CPU); ``.vocab`` is set."""
    config = _read_config(path, kind)
    bb = build_backbone(**config["build"])
    bb.net.load_state_dict(torch.load(Path(path) / WEIGHTS, map_location="cpu"))
    bb.vocab = Vocabulary.load(Path(path) / CLASSES)
    return bb.eval()


# ----------------------------------------------------------------------------- image helpers


def to_float_images(images: Any) -> torch.Tensor:
    """uint8 (N, H, W, 3) array/tensor → float (N, 3, H, W) in [-1, 1]; float input passes."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)
    return images.float()


def dihedral(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per-sample flip/turn of square images: code k in 0..7 = rot90^(k % 4), then flip if k ≥ 4.
    Cells have no orientation, so all 8 variants are the same cell."""
    out = x.clone()
    for k in codes.unique().tolist():
        m = codes == k
        y = torch.rot90(x[m], k % 4, dims=(-2, -1))
        out[m] = y.flip(-1) if k >= 4 else y
    return out


def _batched(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: Any, batch_size: int = 256
) -> torch.Tensor:
    """``fn`` over ``x`` in chunks, no grad; results on the CPU."""
    with torch.no_grad():
        return torch.cat(
            [fn(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
        )


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: BackboneConfig,
    logits_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    on_log: Callable[[int, float], None] | None = None,
) -> float:
    """Cross-entropy training of ``model`` on images x (N, 3, H, W) and labels y (N,); returns
    the mean loss of the last 20 steps. ``logits_fn(batch, generator)`` replaces ``model(batch)``
    (the guidance classifier noises its batch there)."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    logits_fn = logits_fn or (lambda xb, _g: model(xb))
    model.train()
    recent: list[float] = []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)  # (B,)
        xb = (
            dihedral(x[idx], torch.randint(0, 8, (len(idx),), generator=g))
            if cfg.augment
            else x[idx]
        )
        loss = F.cross_entropy(logits_fn(xb, g), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [float(loss.detach())])[-20:]
        if on_log and (step + 1) % 50 == 0:
            on_log(step + 1, sum(recent) / len(recent))
    model.eval()
    return sum(recent) / max(len(recent), 1)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")


def train_backbone(
    shards: str | Path,
    out: str | Path,
    cfg: BackboneConfig | None = None,
    steps: int | None = None,
    split: str = "train",
    on_log: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train the cell-type backbone on ``split`` of a real (or phantom) shard set; save to
    ``out``. Plain torch in this process (also fine inside a Ray worker). Returns metrics with
    the test-split accuracy when the shard set has a test split."""
    from pathloop.data import load_arrays, read_vocab

    cfg = (cfg or BackboneConfig()).model_copy(update={"steps": steps} if steps else {})
    vocab = read_vocab(shards)
    images, labels = load_arrays(shards, split=split)
    if len(images) == 0:
        raise ValueError(f"{shards} has no {split!r} rows to train a backbone on")
    torch.manual_seed(cfg.seed)
    bb = build_backbone(cfg.name, len(vocab), cfg.in_px or images.shape[1])
    x, y = to_float_images(images), torch.from_numpy(labels)
    loss = fit_classifier(bb, x, y, cfg, on_log=on_log)
    metrics = {"loss": loss, "train_accuracy": _accuracy(_batched(bb, x, "cpu"), y)}
    test_x, test_y = load_arrays(shards, split="test")
    if len(test_x):
        metrics["test_accuracy"] = _accuracy(
            _batched(bb, to_float_images(test_x), "cpu"), torch.from_numpy(test_y)
        )
    save_backbone(
        out,
        bb,
        vocab,
        extra={
            "train": cfg.model_dump(),
            "metrics": metrics,
            "shards": str(shards),
            "split": split,
        },
    )
    _mark_standalone(out, cfg.steps)
    return {"path": str(out), **metrics}


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


def stratified_split(
    targets: np.ndarray, holdout_frac: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) row indices; each label (target ≥ 0.5 or not) is split in proportion."""
    rng, train, test = np.random.default_rng(seed), [], []
    labels = np.asarray(targets) >= 0.5
    for lab in (False, True):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        k = int(round(holdout_frac * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


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
            [_batched(embed, dihedral(x, torch.full((len(x),), k)), self.device) for k in variants]
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


def _local_model_dir(ref: str | Path, tracking_uri: str | None) -> Path:
    """A path, a ``result.json`` of a job, or an MLflow ``models:/``/``runs:/`` URI → local dir."""
    from pathloop import tracking

    p = Path(str(ref))
    if p.suffix == ".json" and p.is_file():
        info = json.loads(p.read_text())
        return tracking.resolve_model(info["model_uri"], tracking_uri or info.get("tracking_uri"))
    return tracking.resolve_model(ref, tracking_uri)


def load_reward_model(
    ref: str | Path, tracking_uri: str | None = None, device: str | torch.device = "cpu"
) -> RewardModel:
    """Load Γφ (eval mode) from a directory, a job's ``result.json`` or an MLflow model URI."""
    path = _local_model_dir(ref, tracking_uri)
    meta = _read_config(path, "reward_model")
    model = RewardModel(
        load_backbone(path / "backbone"),
        Vocabulary.load(path / CLASSES),
        hidden=meta["hidden"],
        dropout=meta.get("dropout", 0.1),
    )
    model.head.load_state_dict(torch.load(path / "head.pt", map_location="cpu"))
    model.meta = meta
    return model.to(device).eval()


# ----------------------------------------------------------------------------- subtype Γρ


class SubtypeClassifier(nn.Module):
    """Γρ(x): subtype logits (band/segmented, ...) of images of one parent class."""

    def __init__(self, backbone: Backbone, parent: ClassInfo, subtypes: tuple[str, ...]) -> None:
        super().__init__()
        self.backbone, self.parent, self.subtypes = backbone, parent, tuple(subtypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, S) logits

    def subtype_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, S) log p(subtype | x); differentiable in x and weights."""
        return F.log_softmax(self(x), dim=1)

    def predict(self, images: Any) -> list[str]:
        """Most likely subtype name of each image (uint8 or float, as ``to_float_images``)."""
        logits = _batched(self, to_float_images(images), next(self.parameters()).device)
        return [self.subtypes[i] for i in logits.argmax(1).tolist()]


def _subtype_rows(
    shards: str | Path, parent: ClassInfo, split: str, subtypes: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    from pathloop.data import iter_records

    rows = [
        r
        for r in iter_records(shards, split, [parent.id], ["image", "subtype"])
        if r["subtype"] in subtypes
    ]
    if not rows:
        return np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64)
    return (
        np.stack([r["image"] for r in rows]),
        np.array([subtypes.index(r["subtype"]) for r in rows], dtype=np.int64),
    )


def subtype_recall(pred: np.ndarray, truth: np.ndarray, subtypes: Sequence[str]) -> dict:
    """{recall_<subtype>: share of ``truth == i`` rows predicted i} (NaN for an absent one)."""
    return {
        f"recall_{s}": float((pred[truth == i] == i).mean()) if (truth == i).any() else float("nan")
        for i, s in enumerate(subtypes)
    }


def train_subtype_classifier(
    shards: str | Path,
    parent_class: str | int,
    out: str | Path | None = None,
    cfg: BackboneConfig | None = None,
    steps: int | None = None,
) -> tuple[SubtypeClassifier, dict[str, Any]]:
    """Train Γρ on the train rows of ``parent_class`` that carry a subtype; accuracy on the test
    split (or, without one, on a seeded 20 % of the train rows). Saved to ``out`` if given."""
    from pathloop.data import read_vocab

    cfg = (cfg or BackboneConfig()).model_copy(update={"steps": steps} if steps else {})
    parent = read_vocab(shards).lookup(parent_class)
    if not parent.subtypes:
        raise ValueError(f"class {parent.code} ({parent.name}) has no subtypes in {shards}")
    x, y = _subtype_rows(shards, parent, "train", parent.subtypes)
    tx, ty = _subtype_rows(shards, parent, "test", parent.subtypes)
    if len(tx) == 0:  # no test split: hold out 20 % of the train rows
        tr, te = stratified_split(y.astype(float), 0.2, cfg.seed)
        x, y, tx, ty = x[tr], y[tr], x[te], y[te]
    if len(x) == 0:
        raise ValueError(f"no {parent.name} rows with a subtype in {shards}")
    torch.manual_seed(cfg.seed)
    clf = SubtypeClassifier(
        build_backbone(cfg.name, len(parent.subtypes), cfg.in_px or x.shape[1]),
        parent,
        parent.subtypes,
    )
    loss = fit_classifier(clf, to_float_images(x), torch.from_numpy(y), cfg)
    logits = _batched(clf, to_float_images(tx), "cpu")  # (N_test, S)
    metrics = {
        "loss": loss,
        "accuracy": _accuracy(logits, torch.from_numpy(ty)),
        "n_train": len(x),
        "n_test": len(tx),
        "chance": float(np.bincount(ty).max() / len(ty)) if len(ty) else float("nan"),
        # per subtype: how often a real test image of it is called it (the ceiling for
        # judging generated images of that subtype with this classifier)
        **subtype_recall(logits.argmax(1).numpy(), ty, parent.subtypes),
    }
    if out is not None:
        save_backbone(
            out,
            clf.backbone,
            Vocabulary.from_names(list(parent.subtypes)),
            "subtype",
            {
                "parent": parent.model_dump(),
                "subtypes": list(parent.subtypes),
                "train": cfg.model_dump(),
                "metrics": metrics,
            },
        )
        _mark_standalone(out, cfg.steps)
    return clf, metrics


def load_subtype_classifier(path: str | Path) -> SubtypeClassifier:
    """Load a directory written by ``train_subtype_classifier`` (eval mode, CPU)."""
    config = _read_config(path, "subtype")
    return SubtypeClassifier(
        load_backbone(path, "subtype"),
        ClassInfo.model_validate(config["parent"]),
        tuple(config["subtypes"]),
    )


# ----------------------------------------------------------------------------- guidance


class GuidanceClassifier(nn.Module):
    """p(c | x_t, t) on noisy images: a timm CNN whose 4th input channel is the scaled timestep
    t / (T - 1) * 2 - 1 (the simplest timestep conditioning that works for a small CNN)."""

    def __init__(self, backbone: Backbone, noise: NoiseConfig) -> None:
        super().__init__()
        self.backbone, self.noise = backbone, noise

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) noisy images, t scalar or (B,) → (B, K) logits."""
        t = torch.as_tensor(t, device=x_t.device).float().reshape(-1).expand(len(x_t))  # (B,)
        plane = (t / max(self.noise.num_train_timesteps - 1, 1) * 2 - 1)[:, None, None, None]
        return self.backbone(torch.cat([x_t, plane.expand(-1, 1, *x_t.shape[2:])], dim=1))

    def log_prob(self, x_t: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """(B,) log p(c | x_t, t); rows asking for an id outside 0..K-1 (the null class) get 0,
        i.e. no guidance."""
        logp = F.log_softmax(self(x_t, t), dim=1)  # (B, K)
        ids = torch.as_tensor(class_ids, device=x_t.device).long().reshape(-1)  # (B,)
        ok = (ids >= 0) & (ids < logp.shape[1])
        picked = logp.gather(1, ids.clamp(0, logp.shape[1] - 1)[:, None]).squeeze(1)  # (B,)
        return torch.where(ok, picked, torch.zeros_like(picked))


def guidance_fn(clf: GuidanceClassifier) -> Callable:
    """``diffusion.sample(guidance_fn=...)`` for this classifier (eval mode: BatchNorm fixed;
    moved to the sampler's device on first use)."""
    from pathloop.diffusion import classifier_guidance

    clf.eval()

    def log_prob(x_t: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        if next(clf.parameters()).device != x_t.device:
            clf.to(x_t.device)
        return clf.log_prob(x_t, t, class_ids)  # (B,)

    return classifier_guidance(log_prob)


def _noisy_logits(
    clf: GuidanceClassifier, scheduler: Any, t_max: int
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """``fit_classifier``'s logits_fn: noise each clean batch to t ~ U{0..t_max-1}."""

    def logits(x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, t_max, (len(x0),), generator=g)  # (B,)
        x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)  # (B, 3, H, W)
        return clf(x_t, t)

    return logits


def _noisy_accuracy(
    clf: GuidanceClassifier, scheduler: Any, x: torch.Tensor, y: torch.Tensor, t: int, seed: int
) -> float:
    g = torch.Generator().manual_seed(seed)
    tt = torch.full((len(x),), t)
    x_t = scheduler.add_noise(x, torch.randn(x.shape, generator=g), tt)
    with torch.no_grad():
        return _accuracy(clf(x_t, tt), y)


def train_guidance_classifier(
    shards: str | Path,
    noise_cfg: NoiseConfig,
    out: str | Path | None = None,
    cfg: BackboneConfig | None = None,
    steps: int | None = None,
    classes: list[str | int] | None = None,
) -> tuple[GuidanceClassifier, dict[str, Any]]:
    """Train p(c | x_t, t) on real images noised by ``noise_cfg``'s schedule at uniform t.
    Logits cover every class of the shard set (ids match the diffusion model's) even when
    ``classes`` restricts training. Test-split accuracy at t = 0.05 T, 0.25 T and 0.5 T."""
    from pathloop.data import load_arrays, read_vocab
    from pathloop.diffusion import build_scheduler

    cfg = (cfg or BackboneConfig()).model_copy(update={"steps": steps} if steps else {})
    vocab = read_vocab(shards)
    x, y = load_arrays(shards, "train", classes)
    if len(x) == 0:
        raise ValueError(f"{shards} has no train rows for classes {classes}")
    torch.manual_seed(cfg.seed)
    clf = GuidanceClassifier(
        build_backbone(cfg.name, len(vocab), cfg.in_px or x.shape[1], 4), noise_cfg
    )
    scheduler, T = build_scheduler(noise_cfg, "ddpm"), noise_cfg.num_train_timesteps
    loss = fit_classifier(
        clf,
        to_float_images(x),
        torch.from_numpy(y),
        cfg,
        logits_fn=_noisy_logits(clf, scheduler, T),
    )
    metrics: dict[str, Any] = {"loss": loss}
    tx, ty = load_arrays(shards, "test", classes)
    for frac in (0.05, 0.25, 0.5):
        if len(tx):
            metrics[f"accuracy_t{frac:g}"] = _noisy_accuracy(
                clf, scheduler, to_float_images(tx), torch.from_numpy(ty), int(frac * T), cfg.seed
            )
    if out is not None:
        save_backbone(
            out,
            clf.backbone,
            vocab,
            "guidance",
            {
                "noise": noise_cfg.model_dump(),
                "train": cfg.model_dump(),
                "classes": classes,
                "metrics": metrics,
            },
        )
        _mark_standalone(out, cfg.steps)
    return clf, metrics


def load_guidance_classifier(path: str | Path) -> GuidanceClassifier:
    """Load a directory written by ``train_guidance_classifier`` (eval mode, CPU)."""
    config = _read_config(path, "guidance")
    clf = GuidanceClassifier(
        load_backbone(path, "guidance"), NoiseConfig.model_validate(config["noise"])
    )
    return clf.eval()
