"""Serving benchmark: /v1/generate and /v1/score through Ray Serve against direct calls.

    python -m serve.bench [--clients 4] [--requests 6] [--steps 10] [--only generate,score]

``bench_serve`` returns one dict per figure: {name, value, unit, peer_name, peer_value, target}.
The peer is the same work done in-process on the same model in the same run: ``sample()`` in
batches of ``clients`` images (the replica's ``max_batch_size``) and ``judge_batch`` for scoring,
with the same torch thread count as the replica.

Throughput is measured in ``rounds`` alternating pairs: the direct peer samples while Serve is up
and idle, then the saturated Serve phase runs; both sides are pooled over the rounds. On the
2-core VM the machine's speed drifts by ~15 % from one minute to the next, so phases run one
after the other in separate minutes are not comparable; alternating them is. The direct peer is
also timed with no Ray running at all (before Ray starts and after it stops, pooled) and reported
beside it: an idle Ray cluster with Serve (~0.16 of a core, ~2,000 wake-ups/s across a dozen
processes) is part of what serving costs, and in some runs it slows sample() itself.

Batch scoring (/v1/score/batch, each size of ``score_batch`` images per request, ``clients``
clients) is measured the same way: in ``rounds`` alternating pairs with direct ``judge_batch`` on
batches of that size, both sides pooled. The first size, 256, is the server's default batch cap
(``limits.max_score_batch``) and carries the target; 64 is reported beside it. A request costs
the proxy and the ingress about 20 ms of CPU whatever its size (FastAPI, Serve's router and event
loops, decoding), against about 56 ms for judging 64 images, and on 2 cores that work competes
with the Scorer's: on the idle 2-core machine (2026-12-05), 64 per request reached 0.80-0.85x of
the peer, 256 per request about 0.90x.

Saturation: ``2 * clients`` one-image clients keep a full batch queued while the replica samples
the current one, as a loaded server runs (batch size stays ``clients``; the batches formed are
read back from the Generator and reported). Latency is measured with ``clients`` closed-loop
clients, each waiting for its answer before asking again.

The HTTP clients run as a Ray task, so at Ray's worker niceness like the replicas they load: a
load generator in the driver, at niceness 0, would take the cores from the nice-15 replicas
whenever both want them.
"""

from __future__ import annotations

import argparse
import base64
import itertools
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
    from serve.models import keep_freed_memory

    keep_freed_memory()  # as in the replica, so both sides reuse freed memory alike
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
    """Images/s of judge_batch on the decoded ``pngs``, ``repeat`` times (M5: class id 14)."""
    from pathloop.data import decode_png
    from pathloop.judge import judge_batch

    images = [decode_png(p) for p in pngs]
    t0 = time.perf_counter()
    for _ in range(repeat):
        judge_batch(images, [14] * len(images))
    return len(images) * repeat / (time.perf_counter() - t0)


def _batch_scoring(run_clients, png: bytes, clients: int, batch: int, requests: int, rounds: int):
    """(HTTP images/s, direct images/s in a Ray worker, direct images/s in this process) of
    /v1/score/batch against judge_batch on batches of ``batch`` copies of ``png``, in ``rounds``
    alternating triples, pooled; each HTTP phase is ``clients`` clients posting ``requests``
    batches each, each direct one as many images. The peer runs in a Ray worker, at the
    replicas' niceness: on a machine shared with other work, a peer at niceness 0 gets more of
    the cores than the Scorer it is compared with (the driver's rate is reported beside it)."""
    import ray

    body = [{"image_b64": base64.b64encode(png).decode(), "class_name": "M5"}] * batch
    run_clients(clients, 1, "/v1/score/batch", lambda c, r: body)  # warm-up
    peer = ray.remote(num_cpus=0)(_direct_judge)
    images = clients * requests * batch
    http_s = worker_s = driver_s = 0.0
    for _ in range(rounds):
        worker_s += images / ray.get(peer.remote([png] * batch, clients * requests))
        http_s += run_clients(clients, requests, "/v1/score/batch", lambda c, r: body)[0]
        driver_s += images / _direct_judge([png] * batch, clients * requests)
    return images * rounds / http_s, images * rounds / worker_s, images * rounds / driver_s


def bench_serve(
    work: str | Path,
    checkpoint: str | Path | None = None,
    clients: int = 4,
    requests: int = 6,
    steps: int = 10,
    score_requests: int = 25,
    torch_threads: int = 1,
    rounds: int = 3,
    score_batch: tuple[int, ...] = (256, 64),
    score_images: int = 768,
    only: tuple[str, ...] = ("generate", "score"),
) -> list[dict]:
    """Throughput and p50/p95 latency of /v1/generate and /v1/score images/s, with peers.

    Each of ``rounds`` rounds samples ``2 * requests`` batches of ``clients`` images directly,
    then ``2 * clients`` HTTP clients draw as many images through Serve, ``requests`` each.
    Scoring: one image per request, and each size of ``score_batch`` per /v1/score/batch
    request (``score_images`` images per client and round). ``only`` picks generate and/or
    score."""
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.args import ServeArgs

    work = Path(work)
    ckpt = Path(checkpoint) if checkpoint else tiny_checkpoint(work / "bench_ckpt")
    generating = "generate" in only
    per_client = {b: max(1, score_images // b) for b in score_batch}  # requests per client, round
    no_ray = [_direct_sample(ckpt, clients, requests, steps, torch_threads)] if generating else []
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    args = ServeArgs(
        model=str(ckpt),
        judge=True,
        port=port,
        max_batch_size=clients,
        # 2 * clients load clients from one address: the per-client cap must let them all in.
        limits={
            "max_n": clients,
            "max_concurrent_per_client": 2 * clients,
            "max_score_batch": max(score_batch),
        },
        batch_wait_timeout_s=0.05,
        torch_threads=torch_threads,
    )
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    gen_figs: dict = {}
    try:
        serve.run(build_app(args), name=args.app_name, route_prefix="/")
        load = ray.remote(num_cpus=0)(_clients)

        def run_clients(n: int, count: int, path: str, body) -> tuple[float, list[float]]:
            return ray.get(load.remote(url, n, count, path, body))

        def gen(c: int, r: int) -> dict:
            return {"class_name": str((c + r) % 16), "n": 1, "steps": steps, "seed": 100 * c + r}

        if generating:
            gen_figs = _generate_rounds(
                run_clients,
                gen,
                ckpt,
                args.app_name,
                clients,
                requests,
                steps,
                torch_threads,
                rounds,
            )
        if "score" in only:
            import httpx

            one = httpx.post(f"{url}/v1/generate", json={**gen(0, 0), "format": "png"}, timeout=60)
            score_body = {"image_b64": base64.b64encode(one.content).decode(), "class_name": "M5"}
            s_wall, _ = run_clients(clients, score_requests, "/v1/score", lambda c, r: score_body)
            batch_rates = {
                b: _batch_scoring(run_clients, one.content, clients, b, n, rounds)
                for b, n in per_client.items()
            }
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    figs = []
    if generating:
        no_ray.append(_direct_sample(ckpt, clients, requests, steps, torch_threads))
        figs += _generate_figures(gen_figs, no_ray, clients, requests, steps, rounds)
    if "score" in only:
        judge_rate = _direct_judge([one.content] * clients, score_requests)
        figs += [
            {
                "name": f"serve /v1/score throughput ({clients} clients, judge)",
                "value": clients * score_requests / s_wall,
                "unit": "images/s",
                "peer_name": "direct judge_batch()",
                "peer_value": judge_rate,
                "target": "",
                "note": "one image per request",
            },
        ]
        for b, rates in batch_rates.items():
            figs.append(
                {
                    "name": f"serve /v1/score/batch throughput ({clients} clients, {b} "
                    "images per request, judge)",
                    "value": rates[0],
                    "unit": "images/s",
                    "peer_name": f"direct judge_batch() of {b} images in a Ray worker, alternating",
                    "peer_value": rates[1],
                    "target": ">= 0.8x direct judge_batch()" if b == score_batch[0] else "",
                    "note": f"{rounds} rounds of {clients * per_client[b] * b} images each "
                    "way; each request's images are scored in one model call; the same "
                    f"judge_batch() in the driver (niceness 0): {rates[2]:.0f} images/s",
                }
            )
    return figs


def _generate_rounds(
    run_clients, gen, ckpt, app_name, clients, requests, steps, torch_threads, rounds
) -> dict:
    """Closed-loop latency, then ``rounds`` alternating pairs of direct sample() and saturated
    Serve; what ``_generate_figures`` reports."""
    from ray import serve

    out = {"direct_s": 0.0, "serve_s": 0.0, "direct_lat": [], "formed": [], "in_replica": []}
    out.update(faults=[], gaps=[])  # gaps: replica idle time between two calls under load
    run_clients(clients, 1, "/v1/generate", gen)  # warm-up
    _, out["lat"] = run_clients(clients, requests, "/v1/generate", gen)  # latency: closed loop
    handle = serve.get_deployment_handle("Generator", app_name)
    for _ in range(rounds):
        rate, batch_lat = _direct_sample(ckpt, clients, 2 * requests, steps, torch_threads)
        out["direct_s"] += 2 * clients * requests / rate
        out["direct_lat"] += batch_lat
        before = len(handle.stats.remote().result())
        wall, _ = run_clients(2 * clients, requests, "/v1/generate", gen)  # saturated
        out["serve_s"] += wall
        calls = handle.stats.remote().result()[before:]
        out["formed"] += [c["images"] for c in calls]
        out["in_replica"] += [c["s"] for c in calls]
        out["faults"] += [c["page_faults"] for c in calls]
        out["gaps"] += [b["at"] - a["at"] - a["s"] for a, b in itertools.pairwise(calls)]
    return out


def _generate_figures(g: dict, no_ray: list, clients, requests, steps, rounds) -> list[dict]:
    images = 2 * clients * requests * rounds
    gen_rate, direct_rate = images / g["serve_s"], images / g["direct_s"]
    no_ray_rate = 2 / sum(1 / r for r, _ in no_ray)  # images over the time of both runs
    p50, p95 = _pct(g["lat"], 50) * 1e3, _pct(g["lat"], 95) * 1e3
    batch_ms = statistics.median(g["direct_lat"]) * 1e3
    tag = f"{clients} clients, n=1, {steps} DDIM steps, batch {clients}"
    sat = f"{2 * clients} clients, n=1, {steps} DDIM steps, batch {clients}"
    return [
        {
            "name": f"serve /v1/generate throughput ({sat})",
            "value": gen_rate,
            "unit": "images/s",
            "peer_name": "direct batched sample(), alternating with Serve",
            "peer_value": direct_rate,
            "target": ">= 0.9x direct batched sample()",
            "note": f"{rounds} rounds of {images // rounds} images each way; batches formed: "
            f"mean {np.mean(g['formed']):.2f} images (max_batch_size {clients}) over "
            f"{len(g['formed'])} sample() calls of median "
            f"{statistics.median(g['in_replica']) * 1e3:.0f} ms in the replica (direct: "
            f"{batch_ms:.0f} ms), {statistics.median(g['gaps']) * 1e3:.0f} ms median between "
            f"calls, {statistics.median(g['faults']):.0f} page faults median per call",
        },
        {
            "name": f"serve /v1/generate throughput against no Ray running ({sat})",
            "value": gen_rate,
            "unit": "images/s",
            "peer_name": "direct batched sample(), no Ray running",
            "peer_value": no_ray_rate,
            "target": "",
            "note": f"direct peer {no_ray[0][0]:.2f} images/s before Ray started, "
            f"{no_ray[1][0]:.2f} after it stopped; with Serve up and idle: {direct_rate:.2f}",
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
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/bench_serve")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--score-batch", type=int, nargs="+", default=[256, 64], help="Images per /v1/score/batch."
    )
    p.add_argument("--only", default="generate,score", help="generate and/or score")
    a = p.parse_args(argv)
    rows = bench_serve(
        a.work,
        a.checkpoint,
        a.clients,
        a.requests,
        a.steps,
        rounds=a.rounds,
        score_batch=tuple(a.score_batch),
        only=tuple(a.only.split(",")),
    )
    for r in rows:
        print(
            f"{r['name']}: {r['value']:.1f} {r['unit']}  "
            f"(peer {r['peer_name']}: {r['peer_value']:.1f}; target {r['target']})"
            + (f"\n    {r['note']}" if r.get("note") else "")
        )


if __name__ == "__main__":
    main()
