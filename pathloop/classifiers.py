"""Classifiers on cell images, all built on one timm CNN wrapper (``Backbone``), and their jobs.

* **backbone**: a cell-type classifier trained on the *real* (or phantom) training split; its
  pooled embedding feeds the reward model (``reward.py``). It is deliberately separate from any
  evaluation classifier (``metrics.py``): the backbone shapes the reward that trains the
  diffusion model, and a model must not grade its own teacher.
* **subtype classifier** Γρ(x): band vs segmented (a new concept inside one class); exposes a
  differentiable ``subtype_log_prob`` so finetuning can add its loss (``concepts.py``).
* **guidance classifier** p(c | x_t, t) (Dhariwal & Nichol 2021): the paper's "automatic
  feedback" baseline; ``guidance_fn`` plugs it into ``diffusion.sample``.

Each is saved as a self-describing directory (``model.pt`` + ``config.json`` +
``classes.json``). Images enter as uint8 (N, H, W, 3) arrays or float (N, 3, H, W) tensors in
[-1, 1]. Nothing is ever downloaded: timm models are built with ``pretrained=False``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pathloop.config import ClassifierConfig, Frozen, NoiseConfig, TrackingConfig, updated
from pathloop.harness import finish_run, start_tracked_run
from pathloop.vocab import ClassInfo, Vocabulary

# Backbone presets; any other timm model name is accepted as is (never with hub weights).
BACKBONE_PRESETS: dict[str, str] = {
    "tiny": "test_resnet",  # timm's 0.4M-param ResNet: ~95 % on 32 px phantoms in 150 CPU steps
    "paper": "resnext50_32x4d",  # the paper's reward backbone
}


WEIGHTS, CONFIG, CLASSES, STATE = "model.pt", "config.json", "classes.json", "state.json"


# ----------------------------------------------------------------------------- backbone


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


def read_model_config(path: str | Path, kind: str) -> dict:
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
    config = read_model_config(path, kind)
    bb = build_backbone(**config["build"])
    bb.net.load_state_dict(torch.load(Path(path) / WEIGHTS, map_location="cpu", weights_only=True))
    bb.vocab = Vocabulary.load(Path(path) / CLASSES)
    return bb.eval()


# ----------------------------------------------------------------------------- image helpers


def to_float_images(images: Any) -> torch.Tensor:
    """uint8 (N, H, W, 3) array/tensor (or a list of (H, W, 3) images) → float (N, 3, H, W) in
    [-1, 1]; float input passes."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])  # (N, H, W, 3)
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


def batched(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: Any, batch_size: int = 256
) -> torch.Tensor:
    """``fn`` over ``x`` in chunks, no grad; results on the CPU."""
    with torch.no_grad():
        return torch.cat(
            [fn(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
        )


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


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ClassifierConfig,
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
    cfg: ClassifierConfig | None = None,
    steps: int | None = None,
    split: str = "train",
    on_log: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train the cell-type backbone on ``split`` of a real (or phantom) shard set; save to
    ``out``. Plain torch in this process (also fine inside a Ray worker). Returns metrics with
    the test-split accuracy when the shard set has a test split."""
    from pathloop.data import load_arrays, read_vocab

    cfg = updated(cfg or ClassifierConfig(), **({"steps": steps} if steps else {}))
    vocab = read_vocab(shards)
    images, labels = load_arrays(shards, split=split)
    if len(images) == 0:
        raise ValueError(f"{shards} has no {split!r} rows to train a backbone on")
    torch.manual_seed(cfg.seed)
    bb = build_backbone(cfg.arch, len(vocab), cfg.in_px or images.shape[1])
    x, y = to_float_images(images), torch.from_numpy(labels)
    loss = fit_classifier(bb, x, y, cfg, on_log=on_log)
    metrics = {"loss": loss, "train_accuracy": _accuracy(batched(bb, x, "cpu"), y)}
    test_x, test_y = load_arrays(shards, split="test")
    if len(test_x):
        metrics["test_accuracy"] = _accuracy(
            batched(bb, to_float_images(test_x), "cpu"), torch.from_numpy(test_y)
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
        logits = batched(self, to_float_images(images), next(self.parameters()).device)
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
    cfg: ClassifierConfig | None = None,
    steps: int | None = None,
) -> tuple[SubtypeClassifier, dict[str, Any]]:
    """Train Γρ on the train rows of ``parent_class`` that carry a subtype; accuracy on the test
    split (or, without one, on a seeded 20 % of the train rows). Saved to ``out`` if given."""
    from pathloop.data import read_vocab

    cfg = updated(cfg or ClassifierConfig(), **({"steps": steps} if steps else {}))
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
        build_backbone(cfg.arch, len(parent.subtypes), cfg.in_px or x.shape[1]),
        parent,
        parent.subtypes,
    )
    loss = fit_classifier(clf, to_float_images(x), torch.from_numpy(y), cfg)
    logits = batched(clf, to_float_images(tx), "cpu")  # (N_test, S)
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
    config = read_model_config(path, "subtype")
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
    cfg: ClassifierConfig | None = None,
    steps: int | None = None,
    classes: list[str | int] | None = None,
) -> tuple[GuidanceClassifier, dict[str, Any]]:
    """Train p(c | x_t, t) on real images noised by ``noise_cfg``'s schedule at uniform t.
    Logits cover every class of the shard set (ids match the diffusion model's) even when
    ``classes`` restricts training. Test-split accuracy at t = 0.05 T, 0.25 T and 0.5 T."""
    from pathloop.data import load_arrays, read_vocab
    from pathloop.diffusion import build_scheduler

    cfg = updated(cfg or ClassifierConfig(), **({"steps": steps} if steps else {}))
    vocab = read_vocab(shards)
    x, y = load_arrays(shards, "train", classes)
    if len(x) == 0:
        raise ValueError(f"{shards} has no train rows for classes {classes}")
    torch.manual_seed(cfg.seed)
    clf = GuidanceClassifier(
        build_backbone(cfg.arch, len(vocab), cfg.in_px or x.shape[1], 4), noise_cfg
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
    config = read_model_config(path, "guidance")
    clf = GuidanceClassifier(
        load_backbone(path, "guidance"), NoiseConfig.model_validate(config["noise"])
    )
    return clf.eval()


# ------------------------------------------------------------- jobs (trained in the driver process)


class ClassifierJobConfig(Frozen):
    """What the jobs that train one timm classifier in the driver process share."""

    workdir: str = Field("runs/classifier", description="The model dir, result.json, MLflow db.")
    name: str = Field("classifier", description="MLflow run name.")
    shards: str = Field("runs/demo/data", description="Real (or phantom) shard set.")
    classifier: ClassifierConfig = Field(
        default_factory=ClassifierConfig, description="The network and how it trains."
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


class BackboneJobConfig(ClassifierJobConfig):
    """The reward model's backbone on its own: a cell-type classifier on real cells."""

    workdir: str = Field("runs/backbone", description="The model dir, result.json, MLflow db.")
    name: str = Field("backbone", description="MLflow run name.")
    split: str = Field("train", description="Split to train on; the test split is measured.")
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-backbone")
    )


def run_classifier_job(cfg: ClassifierJobConfig, step: str, train: Any, tags: dict) -> dict:
    """Driver of a job that trains in this process (no Ray): MLflow run, ``train(cfg, model_dir,
    on_log) -> metrics``, the model dir logged and registered, result.json in the workdir."""
    from pathloop import storage, tracking

    cfg = updated(cfg, shards=storage.absolute(cfg.shards))
    cfg, uri, run_id = start_tracked_run(cfg, step, {"pathloop.shards": cfg.shards, **tags})
    workdir = Path(cfg.workdir)
    model_dir = workdir / "model"
    try:
        metrics = train(
            cfg,
            model_dir,
            lambda s, loss: tracking.log_metrics(uri, run_id, {"loss": loss}, s),
        )
    except Exception:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.log_metrics(uri, run_id, metrics, cfg.classifier.steps)
    return finish_run(cfg, uri, run_id, model_dir, metrics)


def run_backbone(cfg: BackboneJobConfig) -> dict[str, Any]:
    """The backbone job without Ray (a small CNN trains in this process); writes result.json.
    The CLI can call this directly."""

    def train(cfg: BackboneJobConfig, out: Path, on_log: Any) -> dict:
        m = train_backbone(cfg.shards, out, cfg.classifier, split=cfg.split, on_log=on_log)
        return {k: v for k, v in m.items() if k != "path"}

    return run_classifier_job(cfg, "backbone", train, {})


class GuidanceJobConfig(ClassifierJobConfig):
    """The classifier-guidance baseline (Dhariwal & Nichol 2021), the paper's "automatic
    feedback" row: a noise-aware classifier p(c | x_t, t) on real cells (train split; test-split
    accuracy at t = 0.05 T, 0.25 T, 0.5 T), for ``diffusion.sample(guidance_fn=...)``."""

    workdir: str = Field("runs/guidance", description="The model dir, result.json, MLflow db.")
    name: str = Field("guidance", description="MLflow run name.")
    pretrained: str | None = Field(
        None,
        description="Diffusion model to guide (path, result.json or MLflow URI): the classifier "
        "learns its noise schedule; None = use `noise`.",
    )
    noise: NoiseConfig = Field(
        default_factory=NoiseConfig, description="Noise schedule; replaced by `pretrained`'s."
    )
    classes: list[str] | None = Field(
        None, description="Train on these classes only (logits still cover every class)."
    )
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-guidance")
    )


def run_guidance_classifier(cfg: GuidanceJobConfig) -> dict[str, Any]:
    """Train and register the noise-aware guidance classifier in this process; result.json."""
    from pathloop.tracking import resolve_model_ref

    tags = {}
    if cfg.pretrained:
        ckpt_dir, model_uri = resolve_model_ref(cfg.pretrained, cfg.tracking)
        noise = json.loads((Path(ckpt_dir) / "config.json").read_text()).get("noise")
        cfg = updated(cfg, noise=NoiseConfig.model_validate(noise or {}))
        tags["pathloop.pretrained"] = model_uri

    def train(cfg: GuidanceJobConfig, out: Path, on_log: Any) -> dict:
        return train_guidance_classifier(
            cfg.shards, cfg.noise, out, cfg.classifier, classes=cfg.classes
        )[1]

    return run_classifier_job(cfg, "guidance", train, tags)
