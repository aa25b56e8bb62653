"""Serving benchmark: /v1/generate and /v1/score through Ray Serve against direct calls.

    python -m serve.bench [--clients 4] [--requests 6] [--steps 10]

``bench_serve`` returns one dict per figure: {name, value, unit, peer_name, peer_value, target}.
The peer is the same work done in-process on the same model in the same run: ``sample()`` in
batches of ``clients`` images (the replica's ``max_batch_size``) and ``judge_batch`` for scoring,
with the same torch thread count as the replica. ``sample()`` is timed before Serve starts and
again after Ray stops, and the two runs are pooled (on 2 cores one such run varies by ~5 %).

Throughput is measured at saturation: ``2 * clients`` one-image clients keep a full batch queued
while the replica samples the current one, as a loaded server runs (batch size stays
``clients``; the batches formed are read back from the Generator and reported). Latency is
measured with ``clients`` closed-loop clients, each waiting for its answer before asking again.
"""

from __future__ import annotations

import argparse
import base64
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path: Path) -> Path:
    """The CPU-sized 'tiny' preset (32 px, ~1M params), untrained, 16 bone-marrow classes."""
    import torch

    from pathloop.config import ModelConfig, NoiseConfig
    from pathloop.diffusion import build_unet, save_checkpoint
    from pathloop.vocab import BONE_MARROW_16

    if (path / "unet").is_dir():
        return path
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(), num_classes=len(BONE_MARROW_16))
    cfg = {"noise": NoiseConfig().model_dump()}
    return save_checkpoint(path, unet, step=0, config=cfg, vocab=BONE_MARROW_16)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _clients(url: str, clients: int, requests: int, path: str, body) -> tuple[float, list[float]]:
    """``clients`` threads each posting ``requests`` times: (wall seconds, latencies in s)."""
    import httpx

    lat: list[float] = []
    lock = threading.Lock()
    gate = threading.Barrier(clients)

    def one(c: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            gate.wait()
            for r in range(requests):
                t0 = time.perf_counter()
                resp = http.post(path, json=body(c, r))
                resp.raise_for_status()
                with lock:
                    lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=one, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    return time.perf_counter() - t0, lat


def _direct_sample(ckpt: Path, clients: int, requests: int, steps: int, threads: int) -> tuple:
    """Images/s and per-batch latency of sample() on batches of ``clients`` images."""
    import torch

    from pathloop.diffusion import load_checkpoint, sample

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ck = load_checkpoint(ckpt)
        kw = dict(sampler="ddim", steps=steps, guidance=2.0, batch_size=clients)
        sample(ck.unet, ck.noise, list(range(clients)), seed=0, **kw)  # warm-up
        lat = []
        t0 = time.perf_counter()
        for r in range(requests):
            t1 = time.perf_counter()
            sample(ck.unet, ck.noise, [(r + c) % 16 for c in range(clients)], seed=r, **kw)
            lat.append(time.perf_counter() - t1)
        return clients * requests / (time.perf_counter() - t0), lat
    finally:
        torch.set_num_threads(before)


def _direct_judge(pngs: list[bytes], repeat: int) -> float:
    from pathloop.data import decode_png
    from pathloop.phantoms import judge_batch

    images = [decode_png(p) for p in pngs]
    t0 = time.perf_counter()
    for _ in range(repeat):
        judge_batch(images, [14] * len(images))
    return len(images) * repeat / (time.perf_counter() - t0)


def bench_serve(
    work: str | Path,
    checkpoint: str | Path | None = None,
    clients: int = 4,
    requests: int = 6,
    steps: int = 10,
    score_requests: int = 25,
    torch_threads: int = 1,
) -> list[dict]:
    """Throughput and p50/p95 latency of /v1/generate and /v1/score images/s, with peers."""
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.args import ServeArgs

    work = Path(work)
    ckpt = Path(checkpoint) if checkpoint else tiny_checkpoint(work / "bench_ckpt")
    # The direct peer runs before Serve starts and again after Ray stops; the two are pooled,
    # so neither side gets the quietest, most warmed-up moment of the run to itself.
    peer_before = _direct_sample(ckpt, clients, requests, steps, torch_threads)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    args = ServeArgs(
        model=str(ckpt),
        judge=True,
        port=port,
        max_batch_size=clients,
        limits={"max_n": clients},
        batch_wait_timeout_s=0.05,
        torch_threads=torch_threads,
    )
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name=args.app_name, route_prefix="/")

        def gen(c: int, r: int) -> dict:
            return {"class_name": str((c + r) % 16), "n": 1, "steps": steps, "seed": 100 * c + r}

        _clients(url, clients, 1, "/v1/generate", gen)  # warm-up
        _, lat = _clients(url, clients, requests, "/v1/generate", gen)  # latency: closed loop
        handle = serve.get_deployment_handle("Generator", args.app_name)
        before = len(handle.stats.remote().result())
        wall, _ = _clients(url, 2 * clients, requests, "/v1/generate", gen)  # saturated
        calls = handle.stats.remote().result()[before:]
        formed, in_replica = [c["images"] for c in calls], [c["s"] for c in calls]
        import httpx

        one = httpx.post(f"{url}/v1/generate", json={**gen(0, 0), "format": "png"}, timeout=60)
        png_b64 = base64.b64encode(one.content).decode()
        score_body = {"image_b64": png_b64, "class_name": "M5"}
        s_wall, _ = _clients(url, clients, score_requests, "/v1/score", lambda c, r: score_body)
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    peer_after = _direct_sample(ckpt, clients, requests, steps, torch_threads)
    # images over the total time of both runs (each samples the same number of images)
    direct_rate = 2 / (1 / peer_before[0] + 1 / peer_after[0])
    direct_lat = peer_before[1] + peer_after[1]
    judge_rate = _direct_judge([one.content] * clients, score_requests)
    gen_rate = 2 * clients * requests / wall
    p50, p95 = _pct(lat, 50) * 1e3, _pct(lat, 95) * 1e3
    batch_ms = statistics.median(direct_lat) * 1e3
    tag = f"{clients} clients, n=1, {steps} DDIM steps, batch {clients}"
    return [
        {
            "name": f"serve /v1/generate throughput ({2 * clients} clients, n=1, {steps} DDIM "
            f"steps, batch {clients})",
            "value": gen_rate,
            "unit": "images/s",
            "peer_name": "direct batched sample()",
            "peer_value": direct_rate,
            "target": ">= 0.9x direct batched sample() (issue #8)",
            "note": f"batches formed: mean {np.mean(formed):.2f} images "
            f"(max_batch_size {clients}) over {len(formed)} sample() calls of median "
            f"{statistics.median(in_replica) * 1e3:.0f} ms in the replica "
            f"(direct: {statistics.median(direct_lat) * 1e3:.0f} ms); direct peer "
            f"{peer_before[0]:.2f} images/s before Serve, {peer_after[0]:.2f} after Ray stopped",
        },
        {
            "name": f"serve /v1/generate latency p50 ({tag})",
            "value": p50,
            "unit": "ms",
            "peer_name": "direct sample() of one batch",
            "peer_value": batch_ms,
            "target": "",
        },
        {
            "name": f"serve /v1/generate latency p95 ({tag})",
            "value": p95,
            "unit": "ms",
            "peer_name": "direct sample() of one batch",
            "peer_value": batch_ms,
            "target": "",
        },
        {
            "name": f"serve /v1/score throughput ({clients} clients, judge)",
            "value": clients * score_requests / s_wall,
            "unit": "images/s",
            "peer_name": "direct judge_batch()",
            "peer_value": judge_rate,
            "target": "",
        },
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/bench_serve")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    rows = bench_serve(a.work, a.checkpoint, a.clients, a.requests, a.steps)
    for r in rows:
        print(
            f"{r['name']}: {r['value']:.1f} {r['unit']}  "
            f"(peer {r['peer_name']}: {r['peer_value']:.1f}; target {r['target']})"
        )


if __name__ == "__main__":
    main()
