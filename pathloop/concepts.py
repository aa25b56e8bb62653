"""New concepts, the bonus step of Sun et al. 2023: split a class into subtypes the original data
did not label (neutrophil → band / segmented) in a pretrained class-conditional diffusion model.

1. ``extend_class_embedding``: a UNet with one more class-embedding row per subtype, each a copy
   of the parent's row; the null class (classifier-free guidance) stays the last row, so every old
   class id — and the null class — gives exactly the old output.
2. ``concepts_loop`` (Ray Train): the denoising loss on subtype-labelled images of the parent
   plus the subtype classifier term, L(θ, φ) + λρ L(θ, ρ): the frozen subtype classifier Γρ
   (``classifiers.SubtypeClassifier``) reads the model's predicted x0 of each new-class image
   and its cross-entropy toward the requested subtype is added. Old-class images are replayed
   with the plain loss so the old classes keep their behaviour.
3. ``run_concepts`` (driver): train Γρ first (or load one), fit, then sample the new classes with
   the one ``diffusion.sample()`` and measure how often Γρ — and an independently trained Γρ, and
   on phantoms the judge — reads the requested subtype; logged to MLflow, registered, printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from pathloop.config import (
    ClassifierConfig,
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


class ConceptEvalConfig(Frozen):
    """How the new classes are measured after training."""

    per_class: int = Field(32, ge=1, description="Samples drawn per new class (and for baselines).")
    sampler: SamplerConfig = Field(
        default_factory=lambda: SamplerConfig(steps=25, guidance=2.0, seed=1000),
        description="The sample() settings of the evaluation draws.",
    )
    independent_classifier: bool = Field(
        True,
        description=(
            "Also train a second subtype classifier (seed + 1) that never shaped the model, and "
            "report its reading: Γρ's own reading is biased by its gradient during training."
        ),
    )
    judge: bool | None = Field(
        None,
        description="Read subtypes with the phantom judge; None = when the shards are phantoms.",
    )
    drift_per_class: int = Field(
        2,
        ge=0,
        description=(
            "Samples per old class drawn from the old and the new model with the same seeds; "
            "their mean absolute pixel difference (0..1) measures old-class drift. 0 = skip."
        ),
    )
    grid_per_class: int = Field(8, ge=1, description="Images per row of the sample grid PNG.")


class ConceptsConfig(Frozen):
    """The new-concepts step: extend a pretrained model with subtype classes and train them."""

    workdir: str = Field("runs/concepts", description="Checkpoints, Ray results, result.json.")
    name: str = Field("concepts", description="Run name (Ray run dir and MLflow run).")
    resume: bool = Field(False, description="Continue from the latest checkpoint in workdir.")
    max_failures: int = Field(2, ge=-1, description="Worker failures Ray Train recovers from.")
    pretrained: str = Field(
        "runs/pretrain/result.json",
        description="Model to extend: checkpoint dir, result.json, models:/ or runs:/ URI.",
    )
    shards: str = Field(
        "runs/demo/data",
        description="Shard set the model was trained on, with the parent's subtype labels.",
    )
    split: str = Field(
        "train", description="Split used for training (Γρ also uses the test split)."
    )
    parent: str = Field("M5", description="Class (name or code) to split into subtypes.")
    subtypes: list[str] | None = Field(
        None, description="Subtypes to add as classes; None = every subtype of the parent."
    )
    subtype_classifier: str | None = Field(
        None,
        description="Trained Γρ (dir or MLflow URI); None = train one on the shards first.",
    )
    classifier: ClassifierConfig = Field(
        default_factory=ClassifierConfig,
        description="When subtype_classifier is None: the Γρ trained on the shards (the "
        "independent reader trains the same way with seed + 1).",
    )
    subtype_weight: float = Field(
        0.1, ge=0, description="λρ: weight of the subtype classifier term L(θ, ρ)."
    )
    subtype_t_max: float = Field(
        0.5,
        gt=0,
        le=1,
        description=(
            "The classifier term applies to draws with t < subtype_t_max × T only: at higher "
            "noise the predicted x0 is a blur that no classifier can read."
        ),
    )
    new_frac: float = Field(
        0.5,
        gt=0,
        le=1,
        description=(
            "Fraction of each global batch drawn from the new classes; the rest replays "
            "old-class images with the plain loss."
        ),
    )
    p_uncond: float = Field(0.1, ge=0, le=1, description="Class dropout kept during training.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Set from `pretrained`.")
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Set from `pretrained`.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=20, ema_decay=0.999)
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=500, batch_size=32, sample_every=0)
    )
    preview: SamplerConfig = Field(default_factory=lambda: SamplerConfig(steps=25))
    eval: ConceptEvalConfig = Field(default_factory=ConceptEvalConfig)
    scaling: WorkersConfig = Field(default_factory=WorkersConfig)
    tracking: TrackingConfig = Field(
        default_factory=lambda: TrackingConfig(register_as="pathloop-concepts")
    )


class ConceptsInputs(WorkerInputs):
    """What ``run_concepts`` hands ``concepts_loop``; ``vocab`` already holds the new classes."""

    cfg: ConceptsConfig = Field(description="The job's config, paths absolute.")
    pretrained_dir: str = Field(description="Local checkpoint dir of the model to extend.")
    parent_id: int = Field(description="Class id of the parent whose class row each new copies.")
    subtypes: list[str] = Field(description="The subtypes added as classes, in id order.")
    classifier_dir: str = Field(description="The subtype classifier Γρ of the loss term.")
    data_file: str = Field(description="The driver's .npz of new-class and replay rows.")


# ----------------------------------------------------------------------------- the model


def extend_class_embedding(unet: Any, parent_id: int, num_new: int) -> Any:
    """A new ``UNet2DModel`` with ``num_new`` class rows inserted before the null class.

    Rows: old classes 0..K-1 unchanged, new classes K..K+n-1 copies of row ``parent_id`` (a new
    concept starts as its parent), null class last (``null_class()`` = num_class_embeds - 1).
    Every other weight is copied, so old ids and the null class give the old outputs exactly.
    """
    import torch
    from diffusers import UNet2DModel

    from pathloop.diffusion import null_class, unwrap

    old = unwrap(unet)
    k = null_class(old)  # number of real classes = the old null id
    if not 0 <= parent_id < k:
        raise ValueError(f"parent class id must be in 0..{k - 1}, got {parent_id}")
    if num_new < 1:
        raise ValueError(f"num_new must be >= 1, got {num_new}")
    new = UNet2DModel.from_config(old.config, num_class_embeds=k + num_new + 1)
    state = old.state_dict()
    w = state["class_embedding.weight"]  # (K + 1, D)
    state["class_embedding.weight"] = torch.cat(
        [w[:k], w[parent_id : parent_id + 1].expand(num_new, -1), w[k:]]
    )  # (K + n + 1, D)
    new.load_state_dict(state)
    p = next(old.parameters())
    return new.to(device=p.device, dtype=p.dtype).train(old.training)


# ----------------------------------------------------------------------------- the loss


def predicted_x0(scheduler: Any, x_t: Any, t: Any, out: Any) -> Any:
    """x0 implied by the UNet output ``out`` at (x_t, t): (B, C, H, W), differentiable.

    eps: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab); v: x0 = sqrt(ab) x_t - sqrt(1-ab) v.
    """
    ab = scheduler.alphas_cumprod.to(x_t.device)[t.long()].float()[:, None, None, None]
    if scheduler.config.prediction_type == "v_prediction":
        return ab.sqrt() * x_t - (1 - ab).sqrt() * out
    return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()


class _Capture:
    """Wraps the UNet so ``losses.diffusion_loss`` stays the one denoising loss while the caller
    still gets x_t and the prediction (for x0) without a second UNet call."""

    def __init__(self, model: Any) -> None:
        self.model, self.x_t, self.out = model, None, None

    def __call__(self, x_t: Any, t: Any, class_labels: Any) -> Any:
        res = self.model(x_t, t, class_labels=class_labels)
        self.x_t, self.out = x_t, res.sample
        return res


def subtype_ce(log_prob: Any, target: Any, keep: Any) -> Any:
    """Per-sample cross-entropy -log p(subtype | x0_hat), zero where ``keep`` is false: (B,)."""
    import torch

    ce = -log_prob.gather(1, target[:, None].long()).squeeze(1)  # (B,)
    return torch.where(keep, ce, torch.zeros_like(ce))


def concepts_draw(cfg: ConceptsConfig, step: int, n_new: int, n_old: int, shape, rank, world):
    """This rank's slice of the step's global draw: new/replay rows, noise, t, class dropout."""
    import torch

    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    b = cfg.train.batch_size
    b_new = round(b * cfg.new_frac)
    pick_new = torch.randint(0, n_new, (b_new,), generator=g)  # (b_new,)
    pick_old = torch.randint(0, max(n_old, 1), (b - b_new,), generator=g)  # (b_old,)
    noise = torch.randn((b, *shape), generator=g)  # (B, C, H, W): new rows first, then replay
    t = torch.randint(0, cfg.noise.num_train_timesteps, (b,), generator=g)  # (B,)
    drop = torch.rand(b, generator=g) < cfg.p_uncond  # (B,)
    per_new, per_old = b_new // world, (b - b_new) // world
    sl_new = slice(rank * per_new, (rank + 1) * per_new)
    sl_old = slice(rank * per_old, (rank + 1) * per_old)

    def both(x):  # this rank's new rows then its replay rows
        return torch.cat([x[:b_new][sl_new], x[b_new:][sl_old]])

    return pick_new[sl_new], pick_old[sl_old], both(noise), both(t), both(drop)


def concepts_loss(cfg: ConceptsConfig, st: Any, clf: Any, data: dict, step: int, rank, world):
    """L(θ, φ) + λρ L(θ, ρ) on this rank's slice; returns (loss, logged parts)."""
    import numpy as np
    import torch

    from pathloop.diffusion import null_class
    from pathloop.finetune import _to_x
    from pathloop.losses import diffusion_loss

    new_x, old_x = data["new_images"], data["old_images"]
    shape = (3, new_x.shape[1], new_x.shape[2])
    pick_new, pick_old, noise, t, drop = concepts_draw(
        cfg, step, len(new_x), len(old_x), shape, rank, world
    )
    x0 = torch.cat([_to_x(new_x, pick_new), _to_x(old_x, pick_old)])  # (b, C, H, W)
    y = torch.from_numpy(
        np.concatenate(
            [data["new_class_ids"][pick_new.numpy()], data["old_class_ids"][pick_old.numpy()]]
        )
    )  # (b,)
    dev = st.device
    labels = torch.where(drop, null_class(st.raw), y).to(dev)
    cap = _Capture(st.model)
    n = len(pick_new)  # this rank's new-class rows come first
    t_new = t[:n].to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=st.autocast):
        l_diff = diffusion_loss(
            cap, st.scheduler, x0.to(dev), labels, noise=noise.to(dev), timesteps=t.to(dev)
        )  # (b,)
        x0_hat = predicted_x0(st.scheduler, cap.x_t[:n], t_new, cap.out[:n].float())  # (n,C,H,W)
        logp = clf.subtype_log_prob(x0_hat.clamp(-1, 1)).float()  # (n, S)
    target = torch.from_numpy(data["new_subtype"][pick_new.numpy()]).to(dev)  # (n,)
    keep = (t_new < cfg.subtype_t_max * cfg.noise.num_train_timesteps) & ~drop[:n].to(dev)
    ce = subtype_ce(logp, target, keep)  # (n,)
    n_keep = keep.sum().clamp(min=1)
    l_rho = ce.sum() / n_keep
    loss = l_diff.mean() + cfg.subtype_weight * l_rho  # Sun et al. 2023: L(θ, φ) + L(θ, ρ)
    hit = ((logp.argmax(1) == target) & keep).sum() / n_keep
    logged = {
        "loss_diffusion": float(l_diff.detach().mean()),
        "loss_subtype": float(l_rho.detach()),
        "x0_subtype_acc": float(hit),  # Γρ on the predicted x0 of kept new-class rows
    }
    return loss, logged


# ----------------------------------------------------------------------------- Ray Train loop


def concepts_loop(config: dict) -> None:
    """Ray Train worker loop: extend the pretrained UNet, then train new classes with replay."""
    inputs = ConceptsInputs.model_validate(config)
    import numpy as np
    import ray.train.torch

    from pathloop.classifiers import load_subtype_classifier
    from pathloop.diffusion import load_checkpoint

    cfg = inputs.cfg
    rank, world, device = worker_context(cfg)
    start = load_checkpoint(inputs.pretrained_dir)  # EMA weights of the pretrained model
    unet = extend_class_embedding(start.unet, inputs.parent_id, len(inputs.subtypes))
    st = build_state(
        cfg, len(inputs.vocab), device, wrap=ray.train.torch.prepare_model, init_unet=unet
    )
    clf = load_subtype_classifier(inputs.classifier_dir).to(device).requires_grad_(False)
    data = dict(np.load(inputs.data_file, allow_pickle=False))
    loss_fn = lambda s: concepts_loss(cfg, st, clf, data, s, rank, world)  # noqa: E731
    train_diffusion(cfg, st, inputs, rank, optimized(st, cfg.optim.grad_clip, loss_fn))


# ----------------------------------------------------------------------------- driver pieces


def parent_and_subtypes(cfg: ConceptsConfig, model_vocab: Any, shard_vocab: Any):
    """The parent class (from the shards, which list its subtypes) and the subtypes to add."""
    if model_vocab.names != shard_vocab.names:
        raise ValueError(
            f"the model's classes {model_vocab.names} differ from the shards' "
            f"{shard_vocab.names}; pair the pretrained model with the shards it was trained on"
        )
    parent = shard_vocab.lookup(cfg.parent)
    if not parent.subtypes:
        with_sub = [c.code for c in shard_vocab.classes if c.subtypes] or "none"
        raise ValueError(
            f"class {parent.code} ({parent.name}) has no subtype labels in {cfg.shards}; "
            f"classes with subtypes: {with_sub} (ingest with --labels to record them)"
        )
    subtypes = tuple(cfg.subtypes) if cfg.subtypes else parent.subtypes
    unknown = sorted(set(subtypes) - set(parent.subtypes))
    if unknown:
        raise ValueError(
            f"subtypes {unknown} are not recorded for {parent.name}; valid: {list(parent.subtypes)}"
        )
    return parent, subtypes


def subtype_classifier_dir(cfg: ConceptsConfig, parent: Any, name: str, seed: int) -> Path:
    """A trained Γρ: ``cfg.subtype_classifier`` when given (for ``name='subtype'``), else one
    trained on the shards into workdir/<name> (reused when resuming)."""
    from pathloop.classifiers import train_subtype_classifier
    from pathloop.tracking import resolve_model_ref

    if cfg.subtype_classifier and name == "subtype":
        return resolve_model_ref(cfg.subtype_classifier, cfg.tracking)[0]
    out = Path(cfg.workdir) / name
    if cfg.resume and (out / "config.json").exists():
        return out
    train_subtype_classifier(cfg.shards, parent.code, out, updated(cfg.classifier, seed=seed))
    return out


def concept_data(
    cfg: ConceptsConfig, parent: Any, subtypes: tuple, first_id: int, clf_subtypes: tuple, out
) -> dict[str, Any]:
    """Save the training rows to ``out`` (.npz): the parent's images labelled with a subtype
    (as new class ids, and as Γρ's subtype index) and every old-class row for replay."""
    import numpy as np

    from pathloop.data import iter_records

    new_x, new_y, new_s, old_x, old_y = [], [], [], [], []
    for r in iter_records(cfg.shards, cfg.split, columns=["image", "class_id", "subtype"]):
        old_x.append(r["image"])
        old_y.append(r["class_id"])
        if r["class_id"] == parent.id and r["subtype"] in subtypes:
            new_x.append(r["image"])
            new_y.append(first_id + subtypes.index(r["subtype"]))
            new_s.append(clf_subtypes.index(r["subtype"]))
    if not new_x:
        raise ValueError(f"no {cfg.split!r} rows of {parent.name} with a subtype in {cfg.shards}")
    np.savez(
        out,
        new_images=np.stack(new_x),
        new_class_ids=np.asarray(new_y, np.int64),
        new_subtype=np.asarray(new_s, np.int64),
        old_images=np.stack(old_x),
        old_class_ids=np.asarray(old_y, np.int64),
    )
    counts = {s: new_y.count(first_id + i) for i, s in enumerate(subtypes)}
    return {"new_images": len(new_x), "per_subtype": counts, "replay_images": len(old_x)}


def concepts_arithmetic(cfg: ConceptsConfig, stats: dict, image_px: int) -> dict[str, Any]:
    """State the numbers before the loop and check that they divide."""
    from pathloop.diffusion import resolve_model_config

    w, b = cfg.scaling.num_workers, cfg.train.batch_size
    b_new = round(b * cfg.new_frac)
    if b_new == 0 or b_new % w or (b - b_new) % w:
        raise ValueError(
            f"train.batch_size={b} × new_frac={cfg.new_frac} gives {b_new} new + {b - b_new} "
            f"replay rows per step; each must be > 0 (new) and divide by scaling.num_workers={w}"
        )
    size = resolve_model_config(cfg.model)["sample_size"]
    if image_px != size:
        raise ValueError(
            f"{cfg.shards} holds {image_px} px images but the model samples {size} px; "
            f"use shards made at {size} px (pathloop ingest --size {size})"
        )
    return {
        **stats,
        "workers": w,
        "global_batch": f"{b_new} new-class + {b - b_new} replay",
        "steps": cfg.train.steps,
        "epochs_over_new": round(cfg.train.steps * b_new / stats["new_images"], 2),
        "subtype_term": f"λρ={cfg.subtype_weight} on t < {cfg.subtype_t_max:g} T",
    }


# ----------------------------------------------------------------------------- evaluation


def _rates(pred: list, want: list) -> float:
    return sum(p == w for p, w in zip(pred, want, strict=True)) / max(len(want), 1)


def subtype_readings(
    readers: dict[str, Any], images: Any, baseline: Any, subtypes: tuple, per_class: int
) -> dict[str, float]:
    """For each reader (name → images → subtype names): accuracy on each new class's samples
    (``images`` are ``per_class`` rows per subtype, in order) and, as the no-concept baseline,
    the rate at which it reads that subtype in the parent's samples from the old model."""
    out: dict[str, float] = {}
    want = [s for s in subtypes for _ in range(per_class)]
    for name, read in readers.items():
        pred, base = read(images), read(baseline)
        for j, s in enumerate(subtypes):
            rows = slice(j * per_class, (j + 1) * per_class)
            out[f"{name}_acc_{s}"] = _rates(pred[rows], want[rows])
            out[f"{name}_baseline_{s}"] = _rates(base, [s] * len(base))
        out[f"{name}_acc"] = _rates(pred, want)
    return out


def _judge_reader(parent_id: int):
    from pathloop.judge import judge_batch

    return lambda imgs: [v.subtype for v in judge_batch(imgs, [parent_id] * len(imgs))]


def _drift(old: Any, new: Any, noise: Any, num_old: int, cfg: ConceptEvalConfig) -> float:
    """Mean |old - new| (0..1 scale) of old-class samples drawn with the same seeds."""
    from pathloop.diffusion import sample

    ids = [c for c in range(num_old) for _ in range(cfg.drift_per_class)]
    a = sample(old, noise, ids, **cfg.sampler.model_dump())
    b = sample(new, noise, ids, **cfg.sampler.model_dump())
    return float((a - b).abs().mean() / 2)  # images in [-1, 1]


def _save_samples(out: Path, images: Any, ids: list, vocab: Any, model_uri: str, step: int, s):
    """The new-class samples as a synthetic shard set with per-image provenance."""
    from pathloop.data import ShardWriter

    with ShardWriter(out, vocab, source_note=f"concepts eval of {model_uri}") as w:
        for i, (img, c) in enumerate(zip(images, ids, strict=True)):
            prov = {
                "model_uri": model_uri,
                "checkpoint_step": step,
                "sampler": s.sampler,
                "steps": s.steps,
                "guidance": s.guidance,
                "seed": s.seed + i,
            }
            w.add(img, int(c), split="none", source="synthetic", provenance=prov)


def evaluate_concepts(
    cfg: ConceptsConfig,
    ckpt_dir: Path,
    start_dir: Path,
    parent: Any,
    subtypes: tuple,
    classifier_dirs: dict[str, Path],
    judge: bool,
    model_uri: str,
) -> dict[str, Any]:
    """Sample the new classes (and the parent from the old model), read their subtypes with each
    classifier (and the judge), measure old-class drift; write a grid PNG and a shard set."""
    from pathloop.classifiers import load_subtype_classifier
    from pathloop.diffusion import load_checkpoint, sample, to_uint8
    from pathloop.viz import image_grid

    new, old = load_checkpoint(ckpt_dir), load_checkpoint(start_dir)
    e, n = cfg.eval, cfg.eval.per_class
    new_ids = [len(old.vocab) + j for j in range(len(subtypes))]
    ids = [c for c in new_ids for _ in range(n)]
    images = to_uint8(sample(new.unet, new.noise, ids, **e.sampler.model_dump()))  # (S n, H, W, 3)
    base = to_uint8(sample(old.unet, old.noise, [parent.id] * n, **e.sampler.model_dump()))
    readers = {k: load_subtype_classifier(d).predict for k, d in classifier_dirs.items()}
    if judge:
        readers["judge"] = _judge_reader(parent.id)
    metrics = subtype_readings(readers, images, base, subtypes, n)
    if e.drift_per_class:
        metrics["old_class_drift"] = _drift(old.unet, new.unet, new.noise, len(old.vocab), e)
    out = Path(cfg.workdir)
    _save_samples(out / "samples", images, ids, new.vocab, model_uri, new.step, e.sampler)
    k = min(e.grid_per_class, n)
    tiles = [
        im
        for rows in [base] + [images[j * n : (j + 1) * n] for j in range(len(subtypes))]
        for im in rows[:k]
    ]
    labels = [f"{parent.code} (before)"] + [new.vocab.lookup(c).code for c in new_ids]
    grid = out / "concepts_grid.png"
    image_grid(tiles, len(labels), k, scale=3, labels=labels).save(grid)
    return {"metrics": metrics, "grid": str(grid), "samples": str(out / "samples")}


def print_readings(metrics: dict, subtypes: tuple, readers: list[str]) -> None:
    """A table: per reader and new class, the accuracy on its samples and the baseline (how
    often the reader sees that subtype in the parent's samples from the old model)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="subtype read on the samples of each new class")
    for col in ("reader", "new class", "accuracy", "baseline (parent, old model)"):
        t.add_column(col, justify="left" if col in ("reader", "new class") else "right")
    for r in readers:
        for s in subtypes:
            t.add_row(r, s, f"{metrics[f'{r}_acc_{s}']:.2f}", f"{metrics[f'{r}_baseline_{s}']:.2f}")
    Console().print(t)
    if "old_class_drift" in metrics:
        Console().print(f"old-class drift (mean |Δpixel|, 0..1): {metrics['old_class_drift']:.4f}")


# ----------------------------------------------------------------------------- driver


def run_concepts(cfg: ConceptsConfig) -> dict[str, Any]:
    """Driver: extend the pretrained model's vocabulary, train Γρ, fit the new classes on Ray
    Train, sample and read them, log to MLflow, register; result.json holds the figures."""
    from rich import print as rprint

    from pathloop import storage, tracking
    from pathloop.classifiers import load_subtype_classifier
    from pathloop.data import read_manifest, read_vocab
    from pathloop.diffusion import load_checkpoint
    from pathloop.tracking import for_workers, resolve_model_ref

    ckpt_dir, pre_uri = resolve_model_ref(cfg.pretrained, cfg.tracking)
    start = load_checkpoint(ckpt_dir)
    shards = storage.absolute(cfg.shards)
    manifest = read_manifest(shards)
    parent, subtypes = parent_and_subtypes(cfg, start.vocab, read_vocab(shards))
    vocab = start.vocab.with_subclasses(parent.code, subtypes)
    cfg = updated(
        cfg,
        shards=shards,
        model=ModelConfig.model_validate(start.config["model"]),
        noise=start.noise or cfg.noise,
    )
    judge = cfg.eval.judge if cfg.eval.judge is not None else "phantom" in manifest["sources"]
    tags = {
        "pathloop.pretrained": pre_uri,
        "pathloop.shards": shards,
        "pathloop.parent": parent.code,
        "pathloop.subtypes": ",".join(subtypes),
    }
    cfg, uri, run_id = prepare_run(cfg, "concepts", tags)
    ckpt_dir = for_workers(ckpt_dir, cfg.workdir, "pretrained_model")

    # ---- Γρ first (trained on the subtype labels), then the training rows
    seed = cfg.classifier.seed
    dirs = {"subtype_clf": subtype_classifier_dir(cfg, parent, "subtype", seed)}
    if cfg.eval.independent_classifier:
        dirs["independent_clf"] = subtype_classifier_dir(cfg, parent, "subtype_eval", seed + 1)
    clf_subtypes = load_subtype_classifier(dirs["subtype_clf"]).subtypes
    missing = sorted(set(subtypes) - set(clf_subtypes))
    if missing:
        raise ValueError(f"subtype classifier {dirs['subtype_clf']} cannot read {missing}")
    clf_metrics = {
        f"{k}_{m}": v
        for k, d in dirs.items()
        for m, v in json.loads((d / "config.json").read_text())["metrics"].items()
    }
    tracking.log_metrics(uri, run_id, clf_metrics, 0)
    data_file = Path(cfg.workdir) / "concepts_data.npz"
    stats = concept_data(cfg, parent, subtypes, len(start.vocab), clf_subtypes, data_file)
    arith = concepts_arithmetic(cfg, stats, manifest["image_size"][0])
    rprint({"config": cfg.model_dump(mode="json"), "arithmetic": arith, "classifiers": clf_metrics})

    # ---- train
    inputs = ConceptsInputs(
        cfg=cfg,
        vocab=vocab,
        mlflow=MlflowRun(uri=uri, run_id=run_id),
        pretrained_dir=str(ckpt_dir),
        parent_id=parent.id,
        subtypes=list(subtypes),
        classifier_dir=str(dirs["subtype_clf"]),
        data_file=str(data_file),
    )
    ckpt = fit(concepts_loop, inputs)

    # ---- sample the new classes and read their subtypes
    ev = evaluate_concepts(
        cfg, ckpt, ckpt_dir, parent, subtypes, dirs, judge, f"runs:/{run_id}/model"
    )
    readers = [*dirs, *(["judge"] if judge else [])]
    print_readings(ev["metrics"], subtypes, readers)
    tracking.log_metrics(
        uri, run_id, {f"eval_{k}": v for k, v in ev["metrics"].items()}, cfg.train.steps
    )
    tracking.log_artifact(uri, run_id, ev["grid"], "eval")
    tracking.log_artifact(uri, run_id, ev["samples"], "eval/samples")
    extra = {
        "new_classes": [c.model_dump(mode="json") for c in vocab.classes[len(start.vocab) :]],
        "eval": ev,
        "classifiers": {**{k: str(d) for k, d in dirs.items()}, **clf_metrics},
        "arithmetic": arith,
        "lineage": tags,
    }
    return finish_run(cfg, uri, run_id, ckpt, extra)
