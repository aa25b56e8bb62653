"""The sampling job: a model (path or MLflow URI) → a synthetic shard set with provenance.

Work is a table of (class, seed) rows mapped over Ray Data actors, each holding the model once and
calling the one ``diffusion.sample()`` loop, so it scales from 2 CPU cores to a GPU cluster.
Image i of the job gets seed ``sampler.seed + i``: the set is the same however it is batched.
The sampler settings choose the weights (EMA or raw), the guidance interval and an optional
guide model (autoguidance), which travels to the actors beside the model.
The model, the output and the image-to-image source may live on any ``pyarrow.fs`` filesystem
(``s3://...``); the checkpoint reaches the actors through Ray's object store, so they need not
share a disk with the driver.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from pathloop.config import Frozen, SamplerConfig, TrackingConfig

EARLIEST = "earliest"  # sampler.guide: the oldest checkpoint the model's own run kept


class SampleConfig(Frozen):
    """Draw ``per_class`` synthetic images for each requested class."""

    model: str = Field(
        "runs/pretrain/result.json",
        description=(
            "Checkpoint dir, models:/name/version, runs:/id/model, or a training result.json."
        ),
    )
    out: str = Field("runs/samples", description="Output shard set: a directory or a URI.")
    per_class: int = Field(16, gt=0, description="Images per class.")
    classes: list[str] | None = Field(None, description="Class names/codes; None = all.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    init_from: str | None = Field(None, description="Shard set for image-to-image (SDEdit) starts.")
    strength: float = Field(0.3, gt=0, le=1, description="Noise level of image-to-image starts.")
    split: str = Field("none", description="Split recorded on the synthetic rows.")
    num_actors: int = Field(
        1,
        ge=1,
        description="Ray Data actors holding a model each; the shards keep the request's order "
        "and images whatever the count.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per actor; None = its reserved CPU (1). On a 2-core box "
        "one actor with 2 threads samples about 1.6x as fast as with 1, two actors with 1 "
        "thread each about 1.2x as fast again (the CPU presets set one or the other).",
    )
    use_gpu: bool = Field(False, description="One GPU per actor.")
    bf16: bool = Field(True, description="bf16 autocast in the UNet on CUDA (ignored on CPU).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


class _Sampler:
    """Ray Data actor: loads the checkpoint once, samples each batch of (class, seed) rows."""

    def __init__(
        self,
        ckpt_files: dict[str, bytes],
        sampler: dict,
        strength: float,
        bf16: bool,
        torch_threads: int | None = None,
        guide_files: dict[str, bytes] | None = None,
    ) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from pathloop import storage

        self.cfg = SamplerConfig.model_validate(sampler)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # This node's copy of the files, whichever node it is, gone once the weights are loaded
        # (every actor of every sampling job would otherwise leave a model's size in /tmp)
        with tempfile.TemporaryDirectory(prefix="pathloop-sampler-") as tmp:
            model_dir = storage.unpack_dir(ckpt_files, Path(tmp) / "model")
            guide_dir = None
            if guide_files:
                guide_dir = storage.unpack_dir(guide_files, Path(tmp) / "guide")
            self.ck, self.guide = load_models(model_dir, guide_dir, self.cfg, self.device)
        self.strength = strength
        self.dtype = torch.bfloat16 if bf16 else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pathloop.data import decode_png
        from pathloop.diffusion import sample, to_uint8

        init = None
        if "init_png" in batch:
            arr = np.stack([decode_png(b) for b in batch["init_png"]])  # (B, H, W, 3) uint8
            init = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, C, H, W)
        x = sample(
            self.ck.unet,
            self.ck.noise,
            batch["class_id"].tolist(),
            sampler=self.cfg.sampler,
            steps=self.cfg.steps,
            guidance=self.cfg.guidance,
            guidance_interval=self.cfg.guidance_interval,
            guide=self.guide,
            seeds=batch["seed"].tolist(),
            batch_size=self.cfg.batch_size,
            init_images=init,
            strength=self.strength if init is not None else 1.0,
            device=self.device,
            dtype=self.dtype,
            channels_last=self.cfg.channels_last,
            compile=self.cfg.compile,
            bf16_cpu=self.cfg.bf16_cpu,
        )
        out = {k: v for k, v in batch.items() if k != "init_png"}
        out["pixels"] = to_uint8(x)  # (B, H, W, 3)
        return out


def resolve_guide(guide: str | None, model_dir: Path, tracking: TrackingConfig) -> Path | None:
    """The local checkpoint dir of ``sampler.guide``: None; 'earliest', the oldest checkpoint
    the model's run kept before the model's own step; else any model reference."""
    from pathloop.diffusion import kept_checkpoints
    from pathloop.tracking import resolve_model_ref

    if guide is None:
        return None
    if guide != EARLIEST:
        return resolve_model_ref(guide, tracking)[0]
    step = int(json.loads((model_dir / "state.json").read_text())["step"])
    earlier = [d for s, d in kept_checkpoints(model_dir) if s < step]
    if not earlier:
        raise ValueError(
            f"guide={EARLIEST}: the run of {model_dir} kept no checkpoint before step {step} "
            "(raise train.keep_checkpoints, or give the guide's checkpoint path)"
        )
    return earlier[0]


def load_models(
    model_dir: Path, guide_dir: Path | None, cfg: SamplerConfig, device: Any = "cpu"
) -> tuple[Any, Any]:
    """(model ``Checkpoint`` with ``cfg.weights`` as its ``unet``, guide unet or None), on
    ``device``; the guide must share the model's classes, schedule and image shape."""
    from pathloop.diffusion import check_guide, load_checkpoint

    ck = load_checkpoint(model_dir, ema=cfg.weights == "ema", map_location=device)
    if guide_dir is None:
        return ck, None
    g = load_checkpoint(guide_dir, ema=(cfg.guide_weights or cfg.weights) == "ema")
    if g.vocab != ck.vocab or g.noise != ck.noise:
        what = "classes" if g.vocab != ck.vocab else "noise schedule"
        raise ValueError(f"guide {guide_dir} has another {what} than model {model_dir}")
    check_guide(ck.unet, g.unet)
    return ck, g.unet.to(device)


def _note(cfg: SampleConfig, model_uri: str, guide: Path | None) -> str:
    """The shard set's source note: the model, and the guidance settings that are not default."""
    s = cfg.sampler
    parts = [f"sampled from {model_uri}"]
    if s.guidance_interval != (0.0, 1.0):
        parts.append(f"guidance_interval={list(s.guidance_interval)}")
    if guide is not None:
        parts.append(f"guide={s.guide} ({guide}, {s.guide_weights or s.weights} weights)")
    if s.weights != "ema":
        parts.append(f"weights={s.weights}")
    return "; ".join(parts)


def _work_table(cfg: SampleConfig, vocab) -> list[dict[str, Any]]:
    """One row per image: class, seed, and the init image for image-to-image."""
    from pathloop.data import encode_png, iter_records

    ids = [vocab.lookup(c).id for c in cfg.classes] if cfg.classes else list(range(len(vocab)))
    rows = [
        {"class_id": c, "seed": cfg.sampler.seed + i}
        for i, c in enumerate(c for c in ids for _ in range(cfg.per_class))
    ]
    if cfg.init_from:
        # MAGIC: start from real cells of *other* classes, taken in a seeded random order.
        pool = list(iter_records(cfg.init_from, columns=["id", "image", "class_id"]))
        if not pool:
            raise ValueError(f"--init-from {cfg.init_from} holds no images")
        rng = np.random.default_rng(cfg.sampler.seed)
        for r in rows:
            cands = [p for p in pool if p["class_id"] != r["class_id"]] or pool
            pick = cands[int(rng.integers(len(cands)))]
            r["init_png"] = encode_png(pick["image"])
            r["init_id"] = pick["id"]
    return rows


def run_sample(cfg: SampleConfig) -> dict[str, Any]:
    """Driver: resolve the model, map the work over actors, write shards with provenance."""
    import ray
    from rich.progress import Progress

    from pathloop import storage
    from pathloop.data import ShardWriter
    from pathloop.tracking import resolve_model_ref

    ckpt_dir, model_uri = resolve_model_ref(cfg.model, cfg.tracking)
    guide_dir = resolve_guide(cfg.sampler.guide, ckpt_dir, cfg.tracking)
    ck, _ = load_models(ckpt_dir, guide_dir, cfg.sampler)  # a guide that does not fit fails here
    vocab, step = ck.vocab, ck.step
    rows = _work_table(cfg, vocab)
    from pathloop.reaper import init_ray

    init_ray(ignore_reinit_error=True)  # a local Ray goes with this process, even on kill -9
    ds = ray.data.from_items(rows).map_batches(
        _Sampler,
        fn_constructor_kwargs={
            "ckpt_files": storage.pack_dir(ckpt_dir, skip=("optimizer.pt",)),
            "sampler": cfg.sampler.model_dump(),
            "strength": cfg.strength,
            "bf16": cfg.bf16,
            "torch_threads": cfg.torch_threads,
            "guide_files": guide_dir and storage.pack_dir(guide_dir, skip=("optimizer.pt",)),
        },
        batch_size=cfg.sampler.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=1 if cfg.use_gpu else 0,
        batch_format="numpy",
    )
    # shards in the work table's order whatever the actor count (paired evaluations rely on it)
    ds.context.execution_options.preserve_order = True
    prov = {
        "model_uri": model_uri,
        "checkpoint_step": step,
        "sampler": cfg.sampler.sampler,
        "steps": cfg.sampler.steps,
        "guidance": cfg.sampler.guidance,
    }
    with (
        ShardWriter(cfg.out, vocab, source_note=_note(cfg, model_uri, guide_dir)) as w,
        Progress(transient=False) as bar,
    ):
        task = bar.add_task("sampling", total=len(rows))
        for r in ds.iter_rows():
            p = dict(prov, seed=int(r["seed"]))
            if cfg.init_from:
                p.update(strength=cfg.strength, init_id=str(r["init_id"]))
            w.add(
                r["pixels"], int(r["class_id"]), split=cfg.split, source="synthetic", provenance=p
            )
            bar.advance(task)
    manifest = w.manifest
    return {
        "out": storage.absolute(cfg.out),
        "num_records": manifest["num_records"],
        "model_uri": model_uri,
        "checkpoint_step": step,
        "guide": str(guide_dir) if guide_dir else None,
    }
