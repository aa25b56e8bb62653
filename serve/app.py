"""The pathloop Ray Serve application: Generator + Scorer deployments behind a FastAPI ingress.

    build_app(ServeArgs) -> Application        typed builder (tests, ``run``)
    app_builder(dict)    -> Application        for Serve config files: ``serve.app:app_builder``
    run(config_path)                           start Ray and Serve, deploy, optionally block

Generator requests are merged with ``@serve.batch``: requests waiting together (up to
``max_batch_size`` images, ``batch_wait_timeout_s``) that share the model and sampling settings
(sampler, steps, guidance, its interval, guide, weights) go into one ``sample()`` call whatever
their classes and seeds; batches Serve forms while the model is busy wait together and are joined
into one call (``MergingRunner``). A request's guide (autoguidance) is another served model,
loaded in the same replica and counted in its ``max_models_per_replica``.

One Generator deployment serves every model of ``ServeArgs.models`` and the registered versions
it allows, by Ray Serve model multiplexing: the ingress sends each request with its model id
(``multiplexed_model_id``), Serve routes it to a replica that has that model loaded when there is
one, and a replica loads a model on first use, keeping at most ``max_models_per_replica`` (LRU).
The default model loads when the ingress starts. The Scorer takes single images (batched by
Serve) and whole batches (``score_many``: one call).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.args import DEFAULT_MODEL, ServeArgs, load_args

__all__ = ["ServeArgs", "app_builder", "build_app", "load_args", "run"]

log = logging.getLogger(__name__)


def _images_in(jobs: list[dict]) -> int:
    return sum(int(j["n"]) for j in jobs)


# ----------------------------------------------------------------------------- deployments


# Batches Serve may hand a Generator or Scorer at once (see MergingRunner); their
# max_ongoing_requests are their batch size times this, so that many batches can wait there.
CONCURRENT_BATCHES = 4


class MergingRunner:
    """One thread runs ``fn(items)``; batches that wait for it together go in as one call.

    ``@serve.batch`` forms the next batch as soon as its first request arrives (within
    ``batch_wait_timeout_s``), even while the model is still busy with the current one. Under
    steady load the requests answered by one call come back over more than that window, so a
    busy Generator would split each wave into small batches and run them one after another.
    Serve hands formed batches over concurrently (``max_concurrent_batches``); here they queue,
    and when the thread is free it takes every waiting batch that fits in ``max_size`` (counted
    by ``size``: images for the Generator, items for the Scorer) and runs them together. An idle
    runner starts a batch as soon as Serve forms it.
    """

    def __init__(
        self,
        fn: Callable[[list], list],
        max_size: int,
        name: str,
        size: Callable[[list], int] = len,
    ) -> None:
        # One long-lived thread runs the model: torch's OpenMP pool belongs to the thread that
        # made it, and a new thread per call (asyncio.to_thread) multiplies spinning pools.
        self.fn, self.max_size, self.size = fn, max_size, size
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.waiting: deque[tuple[list, asyncio.Future]] = deque()
        self.busy = False

    async def run(self, items: list) -> list:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((items, future))
        if not self.busy:
            self._start()
        return await future

    def _start(self) -> None:
        self.waiting = deque(w for w in self.waiting if not w[1].done())  # drop cancelled ones
        if not self.waiting:
            return
        taken = [self.waiting.popleft()]
        size = self.size(taken[0][0])
        while self.waiting and size + self.size(self.waiting[0][0]) <= self.max_size:
            size += self.size(self.waiting[0][0])
            taken.append(self.waiting.popleft())
        merged = [item for items, _ in taken for item in items]
        self.busy = True
        done = asyncio.get_running_loop().run_in_executor(self.pool, self.fn, merged)
        done.add_done_callback(lambda f: self._finish(f, taken))

    def _finish(self, done: asyncio.Future, taken: list) -> None:
        self.busy = False
        err = done.exception()
        results = [] if err else list(done.result())
        for items, future in taken:
            part, results = results[: len(items)], results[len(items) :]
            if future.done():  # its requests were cancelled (timeout): nobody waits
                continue
            if err:
                future.set_exception(err)
            else:
                future.set_result(part)
        if self.waiting:
            self._start()


@serve.deployment(name="Generator")
class Generator:
    """The served diffusion models (multiplexed, loaded on demand); merges concurrent requests
    into batched sample() calls."""

    def __init__(self, args: dict) -> None:
        from serve.models import images_in, run_jobs

        cfg = ServeArgs.model_validate(args)
        self.cfg, self.calls = cfg, []  # every model's sample() calls (stats)

        # Made per instance so that the cache size comes from the config; a plain function,
        # since Serve keeps its cache as an attribute of the function it wraps.
        async def load(model_id: str) -> Any:
            return await self._load(model_id)

        multiplexed = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)
        self.model = multiplexed(load)
        self.runner = MergingRunner(run_jobs, cfg.max_batch_size, "generator", images_in)
        self.generate.set_max_batch_size(cfg.max_batch_size)
        self.generate.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    async def _load(self, model_id: str) -> Any:
        """A ``GeneratorCore`` for a served model id (checked against the config again), loaded
        off the event loop, so the replica keeps answering health checks, in the thread that
        samples, so torch's thread settings are that thread's."""
        from serve.models import GeneratorCore

        log.info("loading model %s", model_id)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.runner.pool, GeneratorCore, self.cfg, model_id, self.calls
        )

    async def info(self) -> dict:
        """Vocabulary, reference and step of the request's model (loaded if it is not)."""
        return (await self.model(serve.get_multiplexed_model_id())).info()

    def stats(self) -> list[dict]:
        return list(self.calls)

    def ready(self) -> bool:
        return True

    @serve.batch(
        max_batch_size=16,
        batch_wait_timeout_s=0.02,
        max_concurrent_batches=CONCURRENT_BATCHES,
        batch_size_fn=_images_in,
    )
    async def generate(self, jobs: list[dict]) -> list[list[bytes]]:
        # Each job names its model (Ray >= 2.50 also splits batches by model id) and maybe a
        # guide, loaded here too; the runner may merge batches of several models: run_jobs
        # makes one run per model.
        ids = [j["model"] for j in jobs] + [j["guide"] for j in jobs if j.get("guide")]
        cores = {m: await self.model(m) for m in dict.fromkeys(ids)}
        items = [(cores[j["model"]], j, cores.get(j.get("guide"))) for j in jobs]
        # Off the event loop, so this replica keeps answering health checks while sampling.
        return await self.runner.run(items)


@serve.deployment(name="Scorer")
class Scorer:
    """Reward model and/or the phantom judge over batches of uploaded images."""

    def __init__(self, args: dict) -> None:
        from serve.models import ScorerCore

        cfg = ServeArgs.model_validate(args)
        self.core = ScorerCore(cfg)
        self.runner = MergingRunner(self.core.run, cfg.score_batch_size, "scorer")
        self.score.set_max_batch_size(cfg.score_batch_size)

    def ready(self) -> bool:
        return True

    @serve.batch(
        max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=CONCURRENT_BATCHES
    )
    async def score(self, items: list[tuple[np.ndarray, int, str]]) -> list[dict]:
        return await self.runner.run(items)

    async def score_many(self, items: list[tuple[np.ndarray, int, str]]) -> list[dict]:
        """One request's batch: one model call (with single images waiting at the time)."""
        return await self.runner.run(items)


class ServeBackend:
    """The API's backend inside the ingress: calls through deployment handles, with timeouts."""

    def __init__(
        self, generator: DeploymentHandle | None, scorer: DeploymentHandle | None, timeout_s: float
    ) -> None:
        self.generator, self.scorer, self.timeout = generator, scorer, timeout_s
        self.has_generator, self.has_scorer = generator is not None, scorer is not None

    async def _call(self, response: Any, what: str) -> Any:
        async def wait() -> Any:
            return await response

        try:
            return await asyncio.wait_for(wait(), self.timeout)
        except TimeoutError:
            response.cancel()
            raise TimeoutError(f"{what} did not answer within {self.timeout:g} s") from None

    def _model(self, model: str) -> DeploymentHandle:
        return self.generator.options(multiplexed_model_id=model)

    async def info(self, model: str) -> dict:
        return await self._call(self._model(model).info.remote(), f"the generator ({model})")

    async def generate(self, job: dict, model: str) -> list[bytes]:
        call = self._model(model).generate.remote({**job, "model": model})
        return await self._call(call, "the generator")

    async def score(self, image: np.ndarray, class_id: int, code: str) -> dict:
        return await self._call(self.scorer.score.remote((image, class_id, code)), "the scorer")

    async def score_many(self, items: list[tuple[np.ndarray, int, str]]) -> list[dict]:
        return await self._call(self.scorer.score_many.remote(items), "the scorer")

    async def ready(self) -> dict[str, bool]:
        out = {}
        for name, handle in (("generator", self.generator), ("scorer", self.scorer)):
            if handle is not None:
                try:
                    out[name] = await asyncio.wait_for(_await(handle.ready.remote()), 5.0)
                except Exception:  # not up (yet): not ready, which is the answer asked for
                    out[name] = False
        return out


async def _await(response: Any) -> Any:
    return await response


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """FastAPI ingress: builds ``serve.api`` in the replica, over handles to the models."""

    async def __init__(
        self,
        args: dict,
        generator: DeploymentHandle | None = None,
        scorer: DeploymentHandle | None = None,
    ) -> None:
        self.args = ServeArgs.model_validate(args)
        self.backend = ServeBackend(generator, scorer, self.args.request_timeout_s)
        self.model_info = None
        if generator is not None:  # waits for the Generator to load the default model
            self.model_info = await _await(
                generator.options(multiplexed_model_id=DEFAULT_MODEL).info.remote()
            )

    def __serve_build_asgi_app__(self) -> Any:
        from serve.api import build_api

        return build_api(self.args, self.backend, self.model_info)


# ----------------------------------------------------------------------------- builders


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application for ``args``: Ingress over Generator (if model) and Scorer."""
    d = args.to_dict()
    generator = scorer = None
    models = {"logging_config": {"enable_access_log": args.model_access_log}}
    if args.model:
        generator = Generator.options(
            num_replicas=args.replicas,
            health_check_period_s=args.health_check_period_s,
            max_ongoing_requests=max(CONCURRENT_BATCHES * args.max_batch_size, 8),
            ray_actor_options={"num_cpus": args.generator_cpus, "num_gpus": args.num_gpus},
            **models,
        ).bind(d)
    if args.reward_model or args.judge:
        scorer = Scorer.options(
            health_check_period_s=args.health_check_period_s,
            max_ongoing_requests=max(CONCURRENT_BATCHES * args.score_batch_size, 8),
            ray_actor_options={"num_cpus": args.scorer_cpus},
            **models,
        ).bind(d)
    return Ingress.options(
        max_ongoing_requests=256,
        health_check_period_s=args.health_check_period_s,
        ray_actor_options={"num_cpus": args.ingress_cpus},
    ).bind(d, generator, scorer)


def app_builder(args: dict) -> serve.Application:
    """Entry point for Serve config files (``import_path: serve.app:app_builder``)."""
    return build_app(ServeArgs.model_validate(args or {}))


def run(
    config_path: str | Path | None = "serve/config.yaml",
    blocking: bool = True,
    overrides: list[str] = (),
) -> DeploymentHandle:
    """Start Ray (if needed) and Serve on args.host:args.port, deploy, and optionally block."""
    import ray

    from pathloop import reaper

    args = load_args(config_path, overrides)
    if not ray.is_initialized():
        # through the reaper: a SIGKILLed `pathloop serve` leaves no Ray process behind
        reaper.init_ray(ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    log.info("serving %s on http://%s:%d%s", args.app_name, args.host, args.port, args.route_prefix)
    return serve.run(
        build_app(args), name=args.app_name, route_prefix=args.route_prefix, blocking=blocking
    )
