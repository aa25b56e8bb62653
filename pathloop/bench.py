"""``make bench``: every benchmark of the project, each a ratio measured side by side in one run.

Writes BENCHMARKS.md (for people) and benchmarks.json (figure → value, unit, peer, ratio, machine,
command). Speed targets are checked here, never by timed assertions in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

COMMAND = "make bench"


@dataclass
class Figure:
    """One measured figure; ``peer`` is what it is compared with in the same run."""

    name: str
    value: float
    unit: str
    peer_name: str | None = None
    peer_value: float | None = None
    target: str | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.peer_value in (None, 0):
            return None
        return self.value / self.peer_value


def machine() -> str:
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def _rate(n: int, fn: Callable[[], object], repeat: int = 1) -> float:
    """Items per second of ``fn`` (which handles ``n`` items), best of ``repeat``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


# ----------------------------------------------------------------------------- foundation


def bench_judge(work: Path) -> list[Figure]:
    from pathloop.judge import judge_batch
    from pathloop.phantoms import generate

    items = list(generate(32, size=32, seed=99))  # 512 images
    imgs, ids = [i for i, _, _ in items], [c for _, c, _ in items]
    rate = _rate(len(imgs), lambda: judge_batch(imgs, ids), repeat=2)
    with _busy_neighbour():
        beside = _rate(len(imgs), lambda: judge_batch(imgs, ids), repeat=2)
    return [
        Figure("judge, 32 px", rate, "images/s", note="one process, pixels only"),
        Figure(
            "judge, 32 px, beside a busy process",
            beside,
            "images/s",
            peer_name="alone",
            peer_value=rate,
            note="another process multiplies 300 x 300 matrices meanwhile (numpy, one "
            "thread): what one busy neighbour thread costs a model call on this machine",
        ),
    ]


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _spin(stop: Any) -> None:
    import numpy as np

    a = np.random.default_rng(0).random((300, 300))
    while not stop.is_set():
        a @ a


@contextmanager
def _busy_neighbour() -> Iterator[None]:
    """A process that keeps one core busy with numpy (one thread) while the block runs."""
    import multiprocessing as mp
    import os

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_spin, args=(stop,), daemon=True)
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update(dict.fromkeys(THREAD_VARS, "1"))  # the child's BLAS: one thread
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    time.sleep(1.0)  # the child has imported numpy and is spinning
    try:
        yield
    finally:
        stop.set()
        proc.join(10)


def bench_readers(work: Path, shards: Path) -> list[Figure]:
    """Ray Data streaming reader vs the plain in-process reader, same shards and transform."""
    import ray

    from pathloop.data import read_shards, torch_batches

    def plain() -> int:
        return sum(len(y) for _, y in torch_batches(shards, batch_size=64, split="train"))

    def ray_data() -> int:
        ds = read_shards(shards, split="train")
        return sum(len(b["class_id"]) for b in ds.iter_torch_batches(batch_size=64))

    n = plain()
    ray.init(ignore_reinit_error=True)
    ray_data()  # warm-up: Ray Data starts its workers once
    r_ray = _rate(n, ray_data, repeat=2)
    r_plain = _rate(n, plain, repeat=2)
    return [
        Figure(
            "reader: Ray Data iter_torch_batches",
            r_ray,
            "images/s",
            "plain in-process reader",
            r_plain,
            note=f"{n} images, decode + augment",
        )
    ]


# ----------------------------------------------------------------------------- diffusion


def _pretrain_cfg(work: Path, shards: Path, steps: int, name: str):
    from pathloop.config import load_config
    from pathloop.pretrain import PretrainConfig

    return load_config(
        PretrainConfig,
        Path(__file__).resolve().parents[1] / "jobs/configs/pretrain.tiny.yaml",
        [
            f"workdir={work / name}",
            f"data.shards={shards}",
            f"train.steps={steps}",
            f"train.log_every={steps // 4}",
            "train.sample_every=0",
            f"train.checkpoint_every={steps}",
            f"tracking.tracking_uri=sqlite:///{work}/bench.db",
        ],
    )


def bare_loop_rate(cfg, steps: int) -> float:
    """The diffusers-example-style loop: same model, batch, step function; no Ray. Images/s
    over the last three quarters of the steps (the first quarter warms up allocators and
    caches), the steps Ray Train's rate is measured over."""
    import torch

    from pathloop.data import read_vocab, torch_batches
    from pathloop.harness import build_state, global_draw, train_step

    torch.set_num_threads(cfg.scaling.torch_threads or cfg.scaling.cpus_per_worker)
    vocab = read_vocab(cfg.data.shards)
    st = build_state(cfg, len(vocab), torch.device("cpu"))
    step, t_warm = 0, None
    while step < steps:
        for x0, y in torch_batches(
            cfg.data.shards,
            batch_size=cfg.train.batch_size,
            split="train",
            augment=cfg.data.augment,
            drop_last=True,
        ):
            noise, t, drop = global_draw(cfg, step, tuple(x0.shape), len(vocab))
            train_step(st, x0, y, noise, t, drop, cfg.optim.grad_clip)
            step += 1
            if step == steps // 4:
                t_warm = time.perf_counter()
            if step >= steps:
                break
    return cfg.train.batch_size * (steps - steps // 4) / (time.perf_counter() - t_warm)


def _ray_rate(cfg) -> tuple[float, float]:
    """Images/s of a Ray Train pretraining run over its reports after the first (the last three
    quarters of the steps: equal windows, so the harmonic mean is images over seconds), and
    the data-wait fraction of the last."""
    import mlflow

    from pathloop.pretrain import run_pretrain

    res = run_pretrain(cfg)
    client = mlflow.MlflowClient(res["tracking_uri"])
    rates = [m.value for m in client.get_metric_history(res["run_id"], "images_per_s")][1:]
    rate = len(rates) / sum(1 / r for r in rates)
    return rate, client.get_metric_history(res["run_id"], "data_wait_frac")[-1].value


def bench_train(work: Path, shards: Path, steps: int) -> list[Figure]:
    """Ray Train pretraining (decoded images cached, the default; and streaming) vs the bare
    loop, same model and global batch, one run. The bare loop runs before and after Ray Train
    and its peer rate is the mean of the two: a 2-core machine's speed drifts by 10 % within
    minutes, as much as the gap measured. Ray is up for every run, bare ones included."""
    import ray

    from pathloop.config import updated

    ray.init(ignore_reinit_error=True)
    cfg = _pretrain_cfg(work, shards, steps, "ray")
    before = bare_loop_rate(cfg, steps)
    ray_rate, wait = _ray_rate(cfg)  # the last three quarters of the steps, as the bare loop's
    after = bare_loop_rate(cfg, steps)
    bare = (before + after) / 2
    contiguous = bare_loop_rate(updated(cfg, train={"channels_last": False}), steps)
    bf16 = bare_loop_rate(updated(cfg, train={"bf16_cpu": True}), steps)
    stream = updated(cfg, workdir=str(work / "ray-stream"), data={"cache": False})
    stream_rate, _ = _ray_rate(stream)
    note = f"tiny preset, 32 px, global batch {cfg.train.batch_size}, {steps} steps"
    bracket = f"bare loop {before:.1f} images/s before Ray Train and {after:.1f} after"
    return [
        Figure(
            "pretrain images/s: Ray Train (1 worker) vs bare PyTorch loop",
            ray_rate,
            "images/s",
            "bare PyTorch loop",
            bare,
            ">= 0.9x",
            note=f"{note}; shards decoded once into the object store (data.cache, the default); "
            f"{bracket}",
        ),
        Figure(
            "pretrain images/s: Ray Train, decoding every epoch (data.cache=false)",
            stream_rate,
            "images/s",
            "bare PyTorch loop",
            bare,
            note=f"{note}; the streaming path for sets larger than the object store",
        ),
        Figure(
            "train step on a CPU: channels_last (train.channels_last auto) vs contiguous",
            after,
            "images/s",
            "contiguous UNet weights (train.channels_last=false)",
            contiguous,
            note=f"{note}; the bare loop, one after the other (the run after Ray Train)",
        ),
        Figure(
            "train step on a CPU: bf16 autocast (train.bf16_cpu) vs fp32",
            bf16,
            "images/s",
            "fp32, channels_last (the run after Ray Train)",
            after,
            note=f"{note}; the bare loop, one after the other; bf16 only where the CPU has "
            "native bf16 instructions (AVX512-BF16, AMX), else both fp32",
        ),
        Figure(
            "pretrain data-wait fraction (Ray Data → Train)",
            wait,
            "fraction",
            target="< 0.05",
        ),
    ]


def bench_sampling(work: Path, checkpoint: Path | None, shards: Path) -> list[Figure]:
    import copy

    from pathloop.data import read_vocab
    from pathloop.diffusion import build_unet, load_checkpoint, sample
    from pathloop.pretrain import PretrainConfig

    if checkpoint is not None:
        ck = load_checkpoint(checkpoint)
        unet, noise = ck.unet, ck.noise
    else:
        cfg = PretrainConfig()
        unet, noise = build_unet(cfg.model, len(read_vocab(shards))), cfg.noise
    ids = [i % 16 for i in range(32)]
    figs = []
    for sampler, steps in (("ddim", 50), ("dpm++", 20)):
        sample(unet, noise, ids[:4], sampler=sampler, steps=2)  # warm-up
        r = _rate(
            len(ids),
            lambda s=sampler, k=steps: sample(
                unet, noise, ids, sampler=s, steps=k, guidance=2.0, batch_size=32
            ),
        )
        figs.append(
            Figure(
                f"sampling {sampler}-{steps}, tiny 32 px, CFG 2",
                r,
                "images/s",
                note="batch 32, one process",
            )
        )
    # The experiments' evaluation sampler (DPM++-10, CFG 1): each layout, and bf16 autocast in
    # channels_last, alternating
    cl = copy.deepcopy(unet)  # converted in place by its first channels_last=True call
    ids = [i % 16 for i in range(64)]
    variants = {
        "contiguous": (unet, False, False),
        "cl": (cl, True, False),
        "bf16": (cl, True, True),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(2):
        for name, (u, layout, bf16) in variants.items():
            run = lambda u=u, layout=layout, bf16=bf16: sample(  # noqa: E731
                u,
                noise,
                ids,
                sampler="dpm++",
                steps=10,
                guidance=1.0,
                batch_size=16,
                channels_last=layout,
                bf16_cpu=bf16,
            )
            rates[name].append(_rate(len(ids), run))
    note = "batch 16, one process, best of two alternating rounds of 64 images"
    figs.append(
        Figure(
            "sampling dpm++-10, CFG 1: channels_last (sampler.channels_last auto) vs contiguous",
            max(rates["cl"]),
            "images/s",
            "contiguous UNet weights (sampler.channels_last=false)",
            max(rates["contiguous"]),
            note=note,
        )
    )
    figs.append(
        Figure(
            "sampling dpm++-10, CFG 1: bf16 autocast (sampler.bf16_cpu) vs fp32",
            max(rates["bf16"]),
            "images/s",
            "fp32, channels_last",
            max(rates["cl"]),
            note=f"{note}; bf16 only where the CPU has native bf16 instructions, else both fp32",
        )
    )
    return figs


def bench_gpu_section() -> list[Figure]:
    """pathloop's training step beside a diffusers-example step, and sample(), with FLOP/s,
    peak memory and compile time (``bench_gpu``: the paper preset on CUDA, tiny on CPU)."""
    from pathloop.bench_gpu import bench_gpu

    return bench_gpu()


def bench_http(work: Path) -> list[Figure]:
    """/v1/generate and /v1/score (one image, and /v1/score/batch) through Ray Serve vs direct
    calls, same model, one run; generation at max_batch_size 4 and 8 (on CPU, a batch of 4 is
    about half a second of work, so the per-request cost of HTTP and Ray shows more there)."""
    from serve.bench import bench_serve

    keys = ("name", "value", "unit", "peer_name", "peer_value", "target")
    figs = []
    for clients in (4, 8):
        # scoring does not depend on the generator's batch size: measured once
        only = ("generate", "score") if clients == 4 else ("generate",)
        for d in bench_serve(work / f"serve{clients}", clients=clients, only=only):
            figs.append(Figure(**{k: d.get(k) for k in keys}, note=d.get("note", "")))
    return figs


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ----------------------------------------------------------------------------- report


NOTES = "\n## Notes"  # BENCHMARKS.md from this heading on is written by people and kept


def kept_notes(md: Path) -> str:
    """The hand-written part of an existing report (from ``NOTES`` on), or ""."""
    text = md.read_text() if md.exists() else ""
    return text[text.index(NOTES) :] if NOTES in text else ""


def write_report(figs: list[Figure], md: Path, js: Path) -> None:
    m = machine()
    rows = [
        "| figure | value | peer | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for f in figs:
        peer = f"{f.peer_value:.4g} ({f.peer_name})" if f.peer_value is not None else ""
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        rows.append(f"| {f.name} | {f.value:.4g} {f.unit} | {peer} | {ratio} | {f.target or ''} |")
    notes = [f"- {f.name}: {f.note}" for f in figs if f.note]
    kept = kept_notes(md)
    md.write_text(
        "# pathloop benchmarks\n\n"
        f"Produced by `{COMMAND}` on {m}, {time.strftime('%Y-%m-%d')}. Each ratio is measured side "
        "by side in the same run. No GPU figures unless the machine line names a GPU.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(notes)
        + "\n"
        + kept
    )
    js.write_text(
        json.dumps(
            {
                f.name: {**asdict(f), "ratio": f.ratio, "machine": m, "command": COMMAND}
                for f in figs
            },
            indent=2,
        )
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks.json"))
    ap.add_argument("--train-steps", type=int, default=120)
    ap.add_argument("--checkpoint", type=Path, default=None, help="Trained model for sampling.")
    ap.add_argument(
        "--only",
        default="judge,readers,train,sampling,gpu,serve",
        help="Comma-separated benchmarks to run (default: all).",
    )
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    from pathloop.scenarios import write_phantoms

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = work / "phantoms"
        write_phantoms(shards, per_class=64, test_per_class=8, size=32, seed=3)
        figs: list[Figure] = []
        for name, fn in (
            ("judge", lambda: bench_judge(work)),
            ("readers", lambda: bench_readers(work, shards)),
            ("train", lambda: bench_train(work, shards, args.train_steps)),
            ("sampling", lambda: bench_sampling(work, args.checkpoint, shards)),
            ("gpu", bench_gpu_section),
            ("serve", lambda: bench_http(work)),
        ):
            if name not in only:
                continue
            print(f"[bench] {name} ...", flush=True)
            figs += fn()
            # The next benchmark starts from no Ray: a cluster left over from this one (its
            # workers, its log streaming into this process) would be timed with it.
            _stop_ray()
            write_report(figs, args.out, args.json)  # partial results survive a failure
    print(args.out.read_text())


if __name__ == "__main__":
    main()
