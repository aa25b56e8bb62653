"""What every training job shares: step state, the step loop, restore, report, rank-0 logging,
and the Ray Train run (``prepare_run`` / ``fit`` / ``finish_run``).

Each job module (``pretrain``, ``finetune``, ``reward``, ``concepts``) holds its config, its
``WorkerInputs``, its worker loop and its driver, and builds them from these pieces: a worker
loop validates its inputs, builds its state and hands ``step_until_done`` one step, a ``save``
and a ``load`` (``restore``) of its checkpoint. Randomness of a step (noise, timesteps, class
dropout) is drawn for the *global* batch from one generator seeded by (seed, step) and sliced
by rank, so N workers compute exactly what 1 worker would on the same data.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pathloop.config import (
    Frozen,
    updated,
)
from pathloop.data import AugmentConfig
from pathloop.vocab import Vocabulary

# --------------------------------------------------------------- configs every diffusion job shares


class DataConfig(Frozen):
    """Which shards feed training."""

    shards: str = Field("runs/demo/data", description="Shard-set directory (train split used).")
    split: str | None = Field("train", description="Split to train on; None = all rows.")
    classes: list[str] | None = Field(None, description="Subset of classes (names or codes).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentations.")
    shuffle_buffer: int = Field(
        4096,
        ge=0,
        description="Images in each worker's Ray Data shuffle buffer, reshuffled every epoch "
        "(shards are stored class by class, so 0 = file order gives one-class batches; a buffer "
        "at least the dataset's size is a full shuffle). With data.cache every epoch is a full "
        "shuffle of the worker's share unless 0.",
    )
    cache: bool = Field(
        True,
        description="Decode the shards once into Ray's object store; each worker reads its "
        "share once into memory and reshuffles and augments it itself every epoch (uint8: 3 KB "
        "per 32 px image, 12 KB at 64 px), so no Ray Data pipeline runs per epoch. false "
        "streams and decodes every epoch, for sets larger than memory.",
    )


class StepsConfig(Frozen):
    """What the shared step loop reads: step arithmetic, report and checkpoint cadence."""

    steps: int = Field(2000, gt=0, description="Total optimizer steps (resume runs up to this).")
    batch_size: int = Field(64, gt=0, description="Global batch; must divide by num_workers.")
    seed: int = Field(0, description="Seed of init and of per-step noise.")
    log_every: int = Field(25, gt=0, description="Steps between metric reports.")
    checkpoint_every: int = Field(500, gt=0, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints Ray keeps on storage.")
    storage: str | None = Field(
        None,
        description="Where Ray Train keeps checkpoints and run state: a path or pyarrow.fs URI "
        "(s3://bucket/prefix, gs://..., file://...) every node reaches; None = <workdir>/ray.",
    )
    fail_at_step: int | None = Field(
        None, description="Fault injection for tests: raise once at this step (marker in workdir)."
    )


class TrainConfig(StepsConfig):
    """The step loop of a diffusion job, with its preview grids and the GPU path."""

    sample_every: int = Field(
        500, ge=0, description="Steps between preview grids; 0 = only at end."
    )
    preview_per_class: int = Field(4, ge=1, description="Images per class in preview grids.")
    final_preview: bool = Field(
        True,
        description="A preview grid at the last step too. pathloop experiment turns it off for "
        "its arms: it draws every model's evaluation set anyway (samples_paired.png shows them "
        "side by side), and the grid would cost each finetuning run a sampling of its own.",
    )
    bf16: bool = Field(
        True,
        description="bf16 autocast (CUDA only). H200, paper preset, batch 256: the diffusers "
        "example step ran at 1,068 images/s in bf16 against 769 in fp32.",
    )
    bf16_cpu: bool = Field(
        False,
        description="bf16 autocast on a CPU with native bf16 instructions (AVX512-BF16, AMX; "
        "fp32 elsewhere). 2-core EPYC, tiny preset, batch 32, one thread: 74 images/s against "
        "50 in fp32.",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="channels_last UNet weights; auto = on a CPU, off on a GPU. CPU (2-core "
        "machine, tiny preset, batch 32): about 1.3x the images/s, with one thread or two. "
        "GPU: the UNet normalises with GroupNorm, which has no channels_last kernel in eager "
        "mode, so every norm converts the activations back and forth; with it on, train_step "
        "ran at 665 images/s against the diffusers example's 1,068 (H200, paper preset, bf16, "
        "eager). Under torch.compile Inductor chooses layouts itself (1,412 images/s with it "
        "on; off is not measured).",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the UNet; auto = on CUDA, off on CPU. Costs a compile at "
        "the first step (and again after a restart): 101 s for the paper preset on an H200, "
        "repaid after ~1,350 steps of batch 256 if eager runs at the example's 1,068 images/s "
        "(compiled: 1,553), so set false for short GPU runs. The first step's seconds are "
        "reported as first_step_s.",
    )


# ----------------------------------------------------------------------------- one train step


@dataclass
class StepState:
    """What a step needs besides the batch; built the same way by Ray and bare loops."""

    model: Any  # the (possibly DDP-wrapped) UNet
    raw: Any  # the bare UNet (EMA, checkpoints)
    ema: Any
    opt: Any
    lr_sched: Any
    scheduler: Any  # diffusers noise scheduler
    device: Any
    autocast: bool


def global_draw(cfg: Any, step: int, shape: tuple[int, ...], num_classes: int, device: Any = None):
    """Noise (B,C,H,W), timesteps (B,) and class-dropout mask (B,) for the global batch, drawn
    on ``device`` (None = CPU) from one generator seeded by (seed, step).

    On CUDA the draw stays on the GPU (no host copy, no sync). Every rank draws the same numbers
    as long as the ranks share a GPU model (CUDA's Philox layout follows the SM count); a CPU
    and a CUDA draw of the same step differ."""
    import torch

    device = torch.device(device or "cpu")
    g = torch.Generator(device).manual_seed(cfg.train.seed * 1_000_003 + step)
    noise = torch.randn(shape, generator=g, device=device)
    t = torch.randint(0, cfg.noise.num_train_timesteps, (shape[0],), generator=g, device=device)
    drop = torch.rand(shape[0], generator=g, device=device) < cfg.model.p_uncond
    return noise, t, drop


def build_state(
    cfg: Any, num_classes: int, device: Any, wrap=None, init_unet: Any = None
) -> StepState:
    """UNet (fresh, or ``init_unet`` to finetune), EMA, AdamW with warm-up, the DDPM scheduler;
    ``wrap`` applies DDP (Ray)."""
    import torch

    from pathloop.diffusion import (
        build_ema,
        build_lr_schedule,
        build_scheduler,
        build_unet,
        cpu_bf16,
        use_channels_last,
    )

    torch.manual_seed(cfg.train.seed)  # same init on every rank and in the bare loop
    raw = (init_unet if init_unet is not None else build_unet(cfg.model, num_classes)).to(device)
    raw.train()
    cuda = device.type == "cuda"
    if use_channels_last(cfg.train.channels_last, device):
        raw = raw.to(memory_format=torch.channels_last)
    ema = build_ema(raw, cfg.optim, foreach=cuda)  # one kernel per op, not per tensor
    opt = torch.optim.AdamW(
        raw.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=cuda
    )
    lr_sched = build_lr_schedule(opt, cfg.optim, cfg.train.steps)
    model = wrap(raw) if wrap else raw
    compile_ = cuda if cfg.train.compile == "auto" else cfg.train.compile
    if compile_:
        model = torch.compile(model)
    return StepState(
        model,
        raw,
        ema,
        opt,
        lr_sched,
        build_scheduler(cfg.noise, "ddpm"),
        device,
        autocast=cuda and cfg.train.bf16 or cpu_bf16(cfg.train.bf16_cpu, device),
    )


def train_step(st: StepState, x0, class_ids, noise, t, drop, grad_clip: float) -> Any:
    """One optimizer step on this rank's slice; returns the local mean loss as a detached
    0-d tensor on the device (``float()`` it only to report: reading it waits for the GPU)."""
    import torch

    from pathloop.diffusion import null_class
    from pathloop.losses import diffusion_loss

    # non_blocking: a blocking host-to-GPU copy would wait for the previous step to finish
    x0, class_ids = x0.to(st.device, non_blocking=True), class_ids.to(st.device, non_blocking=True)
    labels = torch.where(drop.to(st.device), null_class(st.raw), class_ids)  # CFG dropout
    with torch.autocast(st.device.type, dtype=torch.bfloat16, enabled=st.autocast):
        per_sample = diffusion_loss(
            st.model, st.scheduler, x0, labels, noise=noise.to(st.device), timesteps=t.to(st.device)
        )  # (B,)
    return optimizer_step(st, per_sample.mean(), grad_clip)


def optimizer_step(st: StepState, loss: Any, grad_clip: float) -> Any:
    """Backward ``loss``, clip, AdamW step, LR schedule and EMA update; returns the loss,
    detached, still on the device."""
    import torch

    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(st.raw.parameters(), grad_clip)
    st.opt.step()
    st.lr_sched.step()
    st.ema.step(st.raw.parameters())
    return loss.detach()


# ----------------------------------------------------------------------------- batches


def shuffled_batches(source: Any, cfg: Any, per_worker: int, rank: int) -> Any:
    """Endless training batches {"image": (b, C, H, W), "class_id": (b,)} from a Ray Data
    dataset or shard iterator. ``data.cache``: ``source`` holds decoded images
    (``decoded_shards``), which this worker reads once and reshuffles and augments itself every
    epoch (``held_epochs``, seeded by train.seed and rank); otherwise ``source`` decodes and
    augments as it streams, reshuffled every epoch through a seeded local buffer."""
    import torch

    from pathloop.data import held_epochs

    if cfg.data.cache:
        seed = cfg.train.seed * 1013 + rank
        held = held_epochs(source, per_worker, cfg.data.augment, seed, cfg.data.shuffle_buffer > 0)
        return epochs_in_background(lambda: next(held))
    epoch = itertools.count()
    buffer = cfg.data.shuffle_buffer or None
    return epochs_in_background(
        lambda: source.iter_torch_batches(
            batch_size=per_worker,
            drop_last=True,
            dtypes={"image": torch.float32, "class_id": torch.int64},
            local_shuffle_buffer_size=buffer,
            local_shuffle_seed=(cfg.train.seed * 1009 + next(epoch)) * 1013 + rank
            if buffer
            else None,
        )
    )


def epochs_in_background(make_epoch: Any, depth: int = 8) -> Any:
    """Endless batches from ``make_epoch()`` called again at each epoch's end, read ahead by a
    thread. Starting a Ray Data epoch costs seconds; on small shard sets (tens of steps per
    epoch) that start-up would otherwise show up as data wait at every epoch boundary."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            while not stop.is_set():
                for b in make_epoch():
                    while not stop.is_set():
                        try:
                            q.put(b, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as err:  # surface reader errors in the training thread
            q.put(err)

    threading.Thread(target=produce, daemon=True, name="epochs").start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ------------------------------------------------------------------ what a worker loop receives


class MlflowRun(Frozen):
    """The MLflow run a job's rank 0 logs to."""

    uri: str = Field(description="Tracking URI of the run's store.")
    run_id: str = Field(description="The run's id.")


class WorkerInputs(Frozen):
    """What a driver hands its Ray Train workers, as one typed payload: it crosses as a dict
    (``train_loop_config``) and the first line of each worker loop re-validates it. Each job
    subclasses it with its config as ``cfg`` and the inputs its driver prepared."""

    vocab: Vocabulary = Field(description="The classes the model's labels index.")
    mlflow: MlflowRun | None = Field(None, description="Run rank 0 logs to; None = no MLflow.")


def worker_context(cfg: Any) -> tuple[int, int, Any]:
    """(rank, world size, device) of this Ray Train worker; sets torch's thread count from the
    job's scaling."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    torch.set_num_threads(cfg.scaling.torch_threads or cfg.scaling.cpus_per_worker)
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


# ------------------------------------------------------ the step loop: restore, report, checkpoints

Save = Callable[[str, int, dict], None]  # (empty dir, step, metrics): rank 0 writes a checkpoint
Load = Callable[[str], int]  # (checkpoint dir) -> its step, after loading what it holds


def step_until_done(
    cfg: Any,
    step: int,
    one_step: Callable[[int, Any], tuple[Any, dict]],
    log: RankZeroLog,
    save: Save,
    *,
    batches: Iterator | None = None,
    lr: Callable[[], float] | None = None,
    measure: Callable[[], dict] | None = None,
) -> None:
    """The step loop of every training job, from ``step`` up to ``cfg.train.steps``.

    ``one_step(step, batch) -> (loss, extra metrics)`` makes one optimizer step on the next of
    ``batches`` (None: the step draws its rows from data held in memory); the loss may be a
    tensor on the device, read only when reported, so no step waits for the GPU. Every
    ``train.log_every`` steps the window's mean loss and extras are reported with images/s, the
    fraction of time spent waiting for data and ``lr()``; the first report adds
    ``first_step_s`` (torch.compile compiles in that step). ``report`` checkpoints with
    ``save`` on schedule, adding ``measure()``'s metrics. Raises once at ``train.fail_at_step``."""
    parts: list[dict] = []
    t_wait = t_total = 0.0
    first: dict | None = None  # the first step's seconds, added to the first report
    t0 = time.perf_counter()
    while step < cfg.train.steps:
        batch = next(batches) if batches is not None else None
        t1 = time.perf_counter()
        loss, extra = one_step(step, batch)
        parts.append({"loss": loss, **extra})
        if first is None:
            float(loss)  # wait for the device, once, to time the step that compiles
            first = {"first_step_s": time.perf_counter() - t1}
        step += 1
        maybe_inject_failure(cfg, step)
        due = step % cfg.train.log_every == 0 or step == cfg.train.steps
        means = window_means(parts) if due else None  # the window's one wait for the device
        t_wait, t_total = t_wait + (t1 - t0), t_total + (time.perf_counter() - t0)
        metrics = None
        if means is not None:
            metrics = means | first
            metrics.update(
                step=step,
                images_per_s=cfg.train.batch_size * len(parts) / max(t_total, 1e-9),
                data_wait_frac=t_wait / max(t_total, 1e-9),
                **({"lr": lr()} if lr else {}),
            )
            parts, t_wait, t_total, first = [], 0.0, 0.0, {}
        report(cfg, step, metrics, log, save, measure)
        t0 = time.perf_counter()  # checkpoints and previews are not training time


def window_means(parts: list[dict]) -> dict[str, float]:
    """Each metric's mean over a report window as a float; losses that are device tensors are
    read here, once per window."""
    return {k: float(sum(p[k] for p in parts) / len(parts)) for k in parts[0]}


def maybe_inject_failure(cfg: Any, step: int) -> None:
    """Raise once at ``train.fail_at_step`` (tests of FailureConfig and --resume)."""
    marker = Path(cfg.workdir) / ".injected_failure"
    if cfg.train.fail_at_step == step and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")


def restore(load: Load) -> int:
    """The step of the run's newest checkpoint that loads, read back with ``load``; 0 when the
    run has none (a fresh start).

    Ray hands back only its newest checkpoint, which a crash mid-upload or a full disk can leave
    truncated; the older ones it keeps (``train.keep_checkpoints``) sit beside it in the run
    directory, so those are tried next, newest first, each skip said in one line on rank 0."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    quiet = ray.train.get_context().get_world_rank() != 0  # each skip said once, by rank 0
    return load_newest(run_checkpoints(checkpoint), load, tell=(lambda _: None) if quiet else say)


def run_checkpoints(newest: Any) -> list[Any]:
    """``newest`` (a Ray ``Checkpoint``), then the older ``checkpoint_*`` directories of its run,
    newest first. Ray names them by the time they were reported, so names sort by age."""
    import posixpath

    import pyarrow.fs as pafs
    import ray.train

    fs, run_dir = newest.filesystem, posixpath.dirname(newest.path.rstrip("/"))
    name = posixpath.basename(newest.path.rstrip("/"))
    infos = fs.get_file_info(pafs.FileSelector(run_dir))
    older = sorted(
        (
            i.path
            for i in infos
            if i.type == pafs.FileType.Directory
            and i.base_name.startswith("checkpoint_")
            and i.base_name < name
        ),
        reverse=True,
    )
    return [newest, *(ray.train.Checkpoint(p, filesystem=fs) for p in older)]


def load_newest(
    checkpoints: list[Any], load: Load, tell: Callable[[str], None] | None = None
) -> int:
    """``load`` the first of ``checkpoints`` (newest first: Ray ``Checkpoint``s or local dirs)
    that loads and return its step; each one that fails is skipped with one line to ``tell``
    (default ``say``) naming it and why. Raises when none loads."""
    tell, reasons = tell or say, []
    for ck in checkpoints:
        where = str(ck) if isinstance(ck, (str, Path)) else ck.path
        opened = nullcontext(str(ck)) if isinstance(ck, (str, Path)) else ck.as_directory()
        try:
            with opened as d:
                return load(d)
        except Exception as err:  # truncated or corrupt files fail in many ways
            reason = f"{type(err).__name__}: {_short(err)}"
            reasons.append(f"{where} ({reason})")
            tell(f"resume: skipping checkpoint {where}: {reason}")
    raise RuntimeError(f"no checkpoint of this run loads: {'; '.join(reasons)}")


def _short(err: BaseException) -> str:
    """An error's message on one line, cut to 300 characters (tracebacks in logs stay short)."""
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def report(
    cfg: Any,
    step: int,
    metrics: dict | None,
    log: RankZeroLog,
    save: Save,
    measure: Callable[[], dict] | None = None,
) -> None:
    """After each step, on every rank: the window's metrics every log step and, on schedule, a
    checkpoint that rank 0 writes with ``save`` after adding ``measure()``'s metrics (the
    reward model's held-out AUC) to the report; rank 0 also draws the previews that are due."""
    last = step >= cfg.train.steps
    want_ckpt = step % cfg.train.checkpoint_every == 0 or last
    if metrics is None and not want_ckpt:
        return
    metrics = dict(metrics or {"step": step})
    if log.rank == 0:
        if want_ckpt and measure is not None:
            metrics.update(measure())
        log.metrics(metrics, step)
        log.preview(step)
    report_step(metrics, want_ckpt, log.rank, lambda tmp: save(tmp, step, metrics))


def report_step(metrics: dict, want_ckpt: bool, rank: int, save: Callable[[str], None]) -> None:
    """Every rank reports; with a checkpoint due, rank 0 writes it with ``save(tmp_dir)``."""
    import tempfile

    import ray.train

    if not want_ckpt:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save(tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def unet_checkpoints(cfg: Any, st: StepState, vocab: Any) -> tuple[Save, Load]:
    """``(save, load)`` of a diffusion job's checkpoint: UNet, EMA and optimizer, the step, the
    job's config and the class vocabulary, so that its directory alone reloads the model."""
    from pathloop.diffusion import load_checkpoint, save_checkpoint

    def save(tmp: str, step: int, _metrics: dict) -> None:
        config = cfg.model_dump(mode="json")
        save_checkpoint(
            tmp, st.raw, ema_unet=st.ema, optimizer=st.opt, step=step, config=config, vocab=vocab
        )

    def load(d: str) -> int:
        ck = load_checkpoint(d, ema=False, optimizer=True)  # everything read before any is used
        st.raw.load_state_dict(ck.raw_unet.state_dict())
        if ck.ema is not None:
            st.ema.load_state_dict(ck.ema.state_dict())
        if ck.optimizer_state is not None:
            st.opt.load_state_dict(ck.optimizer_state)
        with warnings.catch_warnings():  # stepping before any optimizer.step() is intended here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            for _ in range(ck.step):  # keep the warm-up position
                st.lr_sched.step()
        return ck.step

    return save, load


def optimized(st: StepState, grad_clip: float, loss_fn: Callable[[int], tuple[Any, dict]]):
    """``step_until_done``'s ``one_step`` for a loss drawn from data held in memory:
    ``loss_fn(step) -> (loss, extra metrics)``, then backward and the optimizer step."""

    def one_step(step: int, _batch: None) -> tuple[Any, dict]:
        loss, extra = loss_fn(step)
        return optimizer_step(st, loss, grad_clip), extra

    return one_step


def train_diffusion(
    cfg: Any,
    st: StepState,
    inputs: WorkerInputs,
    rank: int,
    one_step: Callable[[int, Any], tuple[Any, dict]],
    batches: Iterator | None = None,
) -> None:
    """The rest of a diffusion job's worker loop once its state is built: restore the newest
    checkpoint that loads, then step with UNet checkpoints, preview grids and the LR in the
    metrics."""
    save, load = unet_checkpoints(cfg, st, inputs.vocab)
    log = RankZeroLog(cfg, inputs.mlflow, rank, st, inputs.vocab)
    lr = lambda: st.lr_sched.get_last_lr()[0]  # noqa: E731
    step_until_done(cfg, restore(load), one_step, log, save, batches=batches, lr=lr)


# ----------------------------------------------------------------------------- rank-0 logging


def judge_rates(images: list[Any], ids: list[int], vocab: Any) -> dict[str, float]:
    """The phantom judge's plausible rate (``metrics.plausibility_table``) overall and per class
    code, over the classes the judge knows (phantom data); {} when it knows none of them. Named
    as the evaluation names the model's (``JUDGE_RATE``, ``<JUDGE_RATE>/class/<code>`` with
    ``rate`` left out), so training previews and evaluations plot as one metric."""
    import numpy as np

    from pathloop.metrics import plausibility_table, plausible_by_evaluator

    p = plausible_by_evaluator("judge", images, ids, vocab) if images else np.zeros(0)
    if np.isnan(p).all():
        return {}
    table = plausibility_table(p, ids, vocab)
    per_class = {c: row["rate"] for c, row in table["per_class"].items() if row["n"]}
    return {
        JUDGE_RATE: table["overall"]["rate"],
        **{f"{JUDGE_CLASS}/{c}": rate for c, rate in per_class.items()},
    }


# The judge's plausible rate of the model a run trains, by evaluate.flat_metrics' names.
JUDGE_RATE, JUDGE_CLASS = "model/plausibility/judge/rate", "model/plausibility/judge/class"


def say(line: str) -> None:
    """One progress line from a Train worker to the driver's console, once.

    Train V2 patches ``print`` to log the line and, as a Ray worker's ``sys.stdout`` is wrapped,
    also to print it, so the driver showed every line twice. The process's own stdout is what
    Ray forwards, and writing there passes the line once, with no runtime env for the workers.
    """
    print(line, file=sys.__stdout__, flush=True)


def describe(metrics: dict) -> str:
    """A progress line's metrics: loss, images/s and data wait as people read them, the rest
    as ``name value``."""
    formats = {
        "loss": "loss {:.4f}",
        "images_per_s": "{:.1f} img/s",
        "data_wait_frac": "data-wait {:.1%}",
        "first_step_s": "first step {:.1f} s",
    }
    return " ".join(formats.get(k, k + " {:.4g}").format(v) for k, v in metrics.items())


class RankZeroLog:
    """Metrics to MLflow and stdout and, for a diffusion job (``st`` given), preview grids (and
    their mean colour per class) on ``train.sample_every`` and at the end; from rank 0 only."""

    def __init__(
        self,
        cfg: Any,
        mlflow: MlflowRun | None,
        rank: int,
        st: StepState | None = None,
        vocab: Any = None,
    ) -> None:
        self.cfg, self.mlflow, self.rank, self.st, self.vocab = cfg, mlflow, rank, st, vocab

    def metrics(self, m: dict, step: int) -> None:
        from pathloop import tracking

        shown = {k: v for k, v in m.items() if k != "step"}
        if self.rank != 0 or not shown:
            return
        say(f"[{self.cfg.name}] step {step}/{self.cfg.train.steps} {describe(shown)}")
        if self.mlflow:
            tracking.log_metrics(self.mlflow.uri, self.mlflow.run_id, shown, step)

    def preview(self, step: int) -> None:
        from pathloop import drift, tracking
        from pathloop.diffusion import ema_copy
        from pathloop.viz import class_samples, samples_grid

        if self.rank != 0 or self.st is None:
            return
        every, last = self.cfg.train.sample_every, step >= self.cfg.train.steps
        if not ((last and self.cfg.train.final_preview) or (every and step % every == 0)):
            return
        per_class = self.cfg.train.preview_per_class
        unet = ema_copy(self.st.raw, self.st.ema)
        images, ids = class_samples(unet, self.cfg.noise, self.vocab, self.cfg.preview, per_class)
        out = Path(self.cfg.workdir) / "previews" / f"step_{step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        samples_grid(images, self.vocab, per_class).save(out)
        rates = judge_rates(images, ids, self.vocab)
        if rates:
            say(
                f"[{self.cfg.name}] step {step}: the phantom judge passes "
                f"{rates[JUDGE_RATE]:.2f} of {len(images)} preview samples"
            )
        if self.mlflow:
            tracking.log_artifact(self.mlflow.uri, self.mlflow.run_id, out, "samples")
            # mean colour per class: drift (e.g. brightening) shows while the run goes
            colour = drift.preview_metrics(images, ids, self.vocab)
            tracking.log_metrics(self.mlflow.uri, self.mlflow.run_id, rates | colour, step)


# ----------------------------------------------------------------------------- the Ray Train run


def prepare_run(cfg: Any, step: str, tags: dict[str, str]) -> tuple[Any, str, str]:
    """Driver side of any training job: absolute workdir, refuse to clobber a run unless resuming,
    save the resolved config, create (or, on resume, reopen) the MLflow run.

    Returns (cfg with absolute workdir, tracking URI, run id).
    """
    from pathloop import storage

    workdir = Path(storage.absolute(cfg.workdir))
    cfg = updated(cfg, workdir=str(workdir))
    run_dir, state_file = storage.join(ray_storage(cfg), cfg.name), workdir / "run.json"
    if storage.is_dir(run_dir) and not cfg.resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume (resume=true) to continue it, "
            "or choose another workdir/name"
        )
    prev = json.loads(state_file.read_text()) if (cfg.resume and state_file.exists()) else {}
    cfg, uri, run_id = start_tracked_run(cfg, step, tags, prev.get("run_id"))
    state_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    return cfg, uri, run_id


def start_tracked_run(
    cfg: Any, step: str, tags: dict[str, str], run_id: str | None = None
) -> tuple[Any, str, str]:
    """The workdir made absolute and created, the resolved config saved there as config.yaml,
    and an MLflow run (a new one, or ``run_id`` reopened). Returns (cfg, tracking URI, run id)."""
    from pathloop import storage, tracking
    from pathloop.config import dump_config

    workdir = Path(storage.absolute(cfg.workdir))
    cfg = updated(cfg, workdir=str(workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, workdir / "config.yaml")
    uri = tracking.resolve_uri(cfg.tracking, workdir)
    run_id = run_id or tracking.start_run(
        cfg.tracking,
        workdir,
        params=cfg.model_dump(mode="json"),
        tags={"pathloop.step": step, **tags},
        run_name=cfg.tracking.run_name or cfg.name,
    )
    return cfg, uri, run_id


def ray_storage(cfg: Any) -> str:
    """Ray Train's storage for a job: ``train.storage`` (path or URI), else <workdir>/ray."""
    from pathloop import storage

    return storage.absolute(cfg.train.storage or Path(cfg.workdir) / "ray")


def local_checkpoint(ckpt: Any, workdir: str | Path) -> Path:
    """A Ray ``Checkpoint`` as a local directory: its own path on local disk, else a download
    to <workdir>/final_checkpoint (logging and registering the model need local files)."""
    import pyarrow.fs as pafs

    if isinstance(ckpt.filesystem, pafs.LocalFileSystem):
        return Path(ckpt.path)
    return Path(ckpt.to_directory(str(Path(workdir) / "final_checkpoint")))


def fit(loop: Any, inputs: WorkerInputs, datasets: dict | None = None) -> Path:
    """Run ``loop`` on a TorchTrainer with ``inputs`` (a job's ``WorkerInputs``, its config as
    ``inputs.cfg``) and the job's scaling, failure and checkpoint settings.

    Resume needs nothing here: Train V2 restores a run's checkpoint manager from its storage
    (same name and storage_path), so ``get_checkpoint()`` in the loop returns the newest one
    (``restore`` falls back to the older ones kept beside it). ``prepare_run`` refuses to reuse
    a run dir unless ``resume`` is set. Returns the final checkpoint as a local directory."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pathloop import reaper, storage

    cfg = inputs.cfg
    fs, path = storage.resolve(ray_storage(cfg))
    reaper.init_ray(ignore_reinit_error=True)  # a SIGKILLed driver leaves no Ray process behind
    trainer = TorchTrainer(
        loop,
        train_loop_config=inputs.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )
    return local_checkpoint(trainer.fit().checkpoint, cfg.workdir)


def finish_run(cfg: Any, uri: str, run_id: str, ckpt_dir: Path, extra: dict) -> dict[str, Any]:
    """Log and register the final checkpoint from the driver; write result.json (with the
    checkpoint's step when it records one)."""
    from pathloop import tracking

    model_uri = tracking.log_checkpoint_model(uri, run_id, ckpt_dir, cfg.tracking.register_as)
    tracking.end_run(uri, run_id)
    state = ckpt_dir / "state.json"
    out = {
        "run_id": run_id,
        "tracking_uri": uri,
        "model_uri": model_uri,
        "checkpoint": str(ckpt_dir),
        **({"step": json.loads(state.read_text())["step"]} if state.exists() else {}),
        **extra,
    }
    (Path(cfg.workdir) / "result.json").write_text(json.dumps(out, indent=2))
    return out
