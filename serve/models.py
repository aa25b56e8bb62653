"""What the Serve deployments hold: the generator (one sample() loop) and the scorer.

Both are plain classes so the same code runs inside a Ray Serve replica, behind plain uvicorn and
in the benchmark. Models are resolved and loaded in ``__init__``, i.e. when a replica starts, or,
for the models a request names (``served_model``), when one first asks for them.
"""

from __future__ import annotations

import io
import logging
import re
import resource
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pathloop.vocab import BONE_MARROW_16, Vocabulary
from serve.args import DEFAULT_MODEL, ServeArgs

log = logging.getLogger(__name__)

# A reward scorer: (images (N, H, W, 3) uint8, class ids) -> N rewards.
RewardFn = Callable[[Sequence[np.ndarray], Sequence[int]], Sequence[float]]
IMAGE_FORMATS = ("PNG", "JPEG")


class ImageTooLarge(ValueError):
    """An uploaded image is over the byte or side limit (HTTP 413)."""


class BadImage(ValueError):
    """An uploaded image cannot be decoded as PNG or JPEG (HTTP 422)."""


def decode_image(raw: bytes, max_bytes: int, max_side: int) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8; the size is checked from the header before decoding."""
    from PIL import Image

    if len(raw) > max_bytes:
        raise ImageTooLarge(f"image is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in IMAGE_FORMATS:
                raise BadImage(f"image format {im.format} not accepted; send PNG or JPEG")
            w, h = im.size
            if max(w, h) > max_side:
                raise ImageTooLarge(f"image is {w}x{h} px; the limit is {max_side} px a side")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except (BadImage, ImageTooLarge):
        raise
    except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, bomb errors...)
        raise BadImage(f"cannot decode the image as PNG or JPEG ({type(err).__name__})") from None


def fit_size(image: np.ndarray, size: int, resize: bool) -> np.ndarray:
    """``image`` (H, W, 3) as the (size, size, 3) the scorer takes: as it is when it already is,
    else centre-cropped to a square and resized when ``resize``, else BadImage (HTTP 422)."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    if not resize:
        raise BadImage(
            f"image is {w}x{h} px; the scorer takes {size}x{size} px: send that size, or "
            f"resize: true (resize=true on /v1/score/upload) to centre-crop and resize it"
        )
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])  # (side, side, 3)
    how = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC  # area down, smooth up
    return np.asarray(square.resize((size, size), how), dtype=np.uint8)  # (size, size, 3)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default a process that has only ever allocated tensors of a sampling call's size returns
    their memory after every call and page-faults it back in on the next one (measured: 30,000
    to 40,000 minor faults per batch-4 call of the tiny 32 px model in a fresh process, 15 % of
    its time). A process that once held much larger buffers keeps them (0 faults), which is why
    a Serve replica ran 12-20 % slower than the same sample() in a long-lived benchmark process.
    Allocations up to 32 MB now come from the heap, 64 MB of headroom is kept when it grows and
    up to 256 MB of free memory stays mapped. Returns False where malloc is not glibc's.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False
    wanted = {_M_MMAP_THRESHOLD: 32 << 20, _M_TOP_PAD: 64 << 20, _M_TRIM_THRESHOLD: 256 << 20}
    return all(mallopt(key, value) == 1 for key, value in wanted.items())


def _torch_setup(args: ServeArgs) -> Any:
    import torch

    keep_freed_memory()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


# ----------------------------------------------------------------------------- generator


# ----------------------------------------------------------------------------- served models

REGISTERED = re.compile(r"models:/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/([1-9][0-9]{0,8})")


class UnknownModel(ValueError):
    """A request named a model the server does not serve (HTTP 422)."""


def named_models(args: ServeArgs) -> dict[str, str]:
    """{id: reference} of the models the config names: ``default`` (ServeArgs.model) first."""
    return {DEFAULT_MODEL: args.model, **args.models} if args.model else {}


def served_model(args: ServeArgs, requested: str | None) -> str:
    """The id of the model a request asks for: None = ``default``; a configured name; or
    ``models:/<name>/<version>`` of a name in ``registered_models``. Anything else (a path, a
    runs:/ URI, another registered name) is UnknownModel: a client never picks server files."""
    table = named_models(args)
    if requested is None:
        if DEFAULT_MODEL in table:
            return DEFAULT_MODEL
        raise UnknownModel("no default model is served: name one (GET /v1/models lists them)")
    if requested in table:
        return requested
    match = REGISTERED.fullmatch(requested)
    if match and match.group(1) in args.registered_models:
        return requested
    names = ", ".join([*table, *(f"models:/{n}/<version>" for n in args.registered_models)])
    raise UnknownModel(
        f"model {requested[:100]!r} is not served; valid models: {names or 'none'} "
        "(GET /v1/models lists them)"
    )


def model_reference(args: ServeArgs, model_id: str) -> str:
    """What ``model_id`` (a ``served_model`` id) loads from; checked again in the replica."""
    return named_models(args).get(model_id) or served_model(args, model_id)


class ModelCache:
    """At most ``size`` loaded models by id, least recently used unloaded first: the in-process
    (--no-ray) counterpart of a Generator replica's ``@serve.multiplexed`` cache."""

    def __init__(self, load: Callable[[str], Any], size: int) -> None:
        self.load, self.size = load, size
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()  # one load at a time; a second asker waits for it

    def get(self, model_id: str) -> Any:
        with self.lock:
            if model_id in self.models:
                self.models.move_to_end(model_id)
                return self.models[model_id]
            model = self.load(model_id)
            self.models[model_id] = model
            while len(self.models) > self.size:
                gone, _ = self.models.popitem(last=False)
                log.info("unloaded model %s (max_models_per_replica %d)", gone, self.size)
            return model


def run_jobs(
    items: Sequence[tuple[GeneratorCore, dict, GeneratorCore | None]],
) -> list[list[bytes]]:
    """(model, job, guide model or None) triples, maybe of several models: each model's jobs in
    one ``run`` (merged there); PNG bytes per job, in item order."""
    by_core: dict[int, list[int]] = defaultdict(list)
    for i, (core, _, _) in enumerate(items):
        by_core[id(core)].append(i)
    out: list[list[bytes]] = [[] for _ in items]
    for idx in by_core.values():
        core = items[idx[0]][0]
        guides = {items[i][1]["guide"]: items[i][2] for i in idx if items[i][2] is not None}
        for i, pngs in zip(idx, core.run([items[i][1] for i in idx], guides), strict=True):
            out[i] = pngs
    return out


def images_in(items: Sequence[tuple]) -> int:
    """Images of (model, job, guide) items: what a Generator batch is counted in."""
    return sum(int(item[1]["n"]) for item in items)


# Sampling settings of a job that its images share, with the values of a job that names none.
JOB_SETTINGS: dict[str, Any] = {
    "sampler": "ddim",
    "steps": 50,
    "guidance": 2.0,
    "guidance_interval": (0.0, 1.0),
    "guide": None,
    "weights": "ema",
    "guide_weights": None,
}


def job_settings(job: dict) -> tuple:
    """The settings ``job`` shares with the jobs it may be merged with (hashable)."""
    out = {k: job.get(k, default) for k, default in JOB_SETTINGS.items()}
    out.update(
        steps=int(out["steps"]),
        guidance=float(out["guidance"]),
        guidance_interval=tuple(float(v) for v in out["guidance_interval"]),
    )
    return tuple(out.values())


class GeneratorCore:
    """A loaded checkpoint and the merged sampling of many requests.

    A *job* is one request: {class_id, n, seed} and the settings of ``JOB_SETTINGS`` (sampler,
    steps, guidance, guidance_interval, guide, weights, guide_weights). Jobs with the same
    settings go into one ``sample()`` call whatever their classes and seeds;
    image k of a job keeps seed ``seed + k`` (``sample(seeds=...)``), so its pixels do not depend
    on what it was batched with (up to float rounding of batched convolutions: at most 1 level).
    """

    def __init__(
        self,
        args: ServeArgs,
        model_id: str = DEFAULT_MODEL,
        calls: list[dict] | None = None,
    ) -> None:
        from pathloop.diffusion import load_checkpoint
        from pathloop.tracking import resolve_model

        if args.model is None:
            raise ValueError("ServeArgs.model is None: no diffusion model to load")
        ref = model_reference(args, model_id)
        self.device = _torch_setup(args)
        ck = load_checkpoint(resolve_model(ref, args.tracking_uri), map_location=self.device)
        if ck.noise is None:
            raise ValueError(f"checkpoint {ref} has no noise config (config.json 'noise')")
        self.unet, self.noise, self.vocab, self.step = ck.unet.eval(), ck.noise, ck.vocab, ck.step
        self.path, self.raw_unet = ck.path, None  # raw weights: loaded on first request
        self.model_id, self.model_uri = model_id, ref
        self.batch_size = args.max_batch_size
        # one entry per sample() call (requests and images merged); shared by a replica's models
        self.calls: list[dict] = [] if calls is None else calls
        log.info("generator: %s (step %d) on %s", self.model_uri, self.step, self.device)

    def info(self) -> dict:
        return {
            "vocab": self.vocab.model_dump(mode="json"),
            "model": self.model_id,
            "model_uri": self.model_uri,
            "checkpoint_step": self.step,
            "sample_size": int(self.unet.config.sample_size),
        }

    def stats(self) -> list[dict]:
        """The sample() calls made so far (requests and images each merged)."""
        return list(self.calls)

    def weights(self, which: str) -> Any:
        """The UNet with ``which`` weights: ema (loaded; raw when the checkpoint has no EMA) or
        raw (loaded from the checkpoint on first use, then kept)."""
        if which == "ema":
            return self.unet
        if self.raw_unet is None:
            from pathloop.diffusion import load_checkpoint

            self.raw_unet = load_checkpoint(self.path, ema=False, map_location=self.device).unet
        return self.raw_unet

    def run(
        self, jobs: Sequence[dict], guides: dict[str, GeneratorCore] | None = None
    ) -> list[list[bytes]]:
        """PNG bytes of every image of every job, in job order; ``guides``: the loaded models
        that jobs name as ``guide``, by id."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job_settings(job)].append(i)
        out: list[list[bytes]] = [[] for _ in jobs]
        for settings, idx in groups.items():
            kw = dict(zip(JOB_SETTINGS, settings, strict=True))
            guide_id, guide_weights = kw.pop("guide"), kw.pop("guide_weights")
            kw["guide"] = (
                guides[guide_id].weights(guide_weights or kw["weights"]) if guide_id else None
            )
            pngs = self._sample(kw, [jobs[i] for i in idx])
            for i in idx:
                out[i], pngs = pngs[: jobs[i]["n"]], pngs[jobs[i]["n"] :]
        return out

    def _sample(self, kw: dict[str, Any], jobs: list[dict]) -> list[bytes]:
        """One ``sample()`` call of ``jobs`` with the settings ``kw`` (guide as a module)."""
        from pathloop.data import encode_png
        from pathloop.diffusion import sample, to_uint8

        at, start, cpu = time.time(), time.perf_counter(), time.thread_time()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ids = [int(j["class_id"]) for j in jobs for _ in range(j["n"])]
        seeds = [int(j["seed"]) + k for j in jobs for k in range(j["n"])]
        steps, unet = kw["steps"], self.weights(kw.pop("weights"))
        x = sample(
            unet, self.noise, ids, seeds=seeds, batch_size=self.batch_size, device=self.device, **kw
        )  # (N, C, H, W)
        seconds = round(time.perf_counter() - start, 4)
        cpu_s = round(time.thread_time() - cpu, 4)  # this thread's CPU time: < s when it waits
        call = {"requests": len(jobs), "images": len(ids), "steps": steps, "model": self.model_id}
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults  # whole process
        self.calls.append({**call, "at": at, "s": seconds, "cpu_s": cpu_s, "page_faults": faults})
        return [encode_png(im) for im in to_uint8(x)]  # (H, W, 3) each


# ----------------------------------------------------------------------------- scorer


def load_scorer(ref: str, tracking_uri: str | None = None) -> RewardFn:
    """The reward model (path, result.json or MLflow URI) as an (images, class_ids) -> rewards
    callable; loaded when the Scorer replica starts, never at import."""
    from pathloop.reward import load_reward_model

    return load_reward_model(ref, tracking_uri=tracking_uri).score


class ScorerCore:
    """Reward model and/or the phantom judge over a batch of (image, class id, class code)."""

    def __init__(self, args: ServeArgs) -> None:
        self.reward = (
            load_scorer(args.reward_model, args.tracking_uri) if args.reward_model else None
        )
        self.judge = args.judge
        if self.reward is None and not self.judge:
            raise ValueError("ScorerCore needs reward_model or judge: true")

    def run(self, items: Sequence[tuple[np.ndarray, int, str]]) -> list[dict]:
        images = [it[0] for it in items]
        rewards: Sequence[float | None] = [None] * len(items)
        if self.reward is not None:
            rewards = [float(r) for r in self.reward(images, [int(it[1]) for it in items])]
        verdicts = self._judge(images, [it[2] for it in items]) if self.judge else None
        out = []
        for i, r in enumerate(rewards):
            v = verdicts[i] if verdicts is not None else None
            out.append(
                {
                    "reward": r,
                    "plausible": None if v is None else bool(v.plausible),
                    "criteria": None if v is None else {k: bool(b) for k, b in v.criteria.items()},
                    "failed_criteria": None if v is None else list(v.failed),
                    "subtype": None if v is None else v.subtype,
                }
            )
        return out

    @staticmethod
    def _judge(images: list[np.ndarray], codes: list[str]) -> list[Any]:
        """Judge verdicts; classes the judge does not know (by code) get None."""
        from pathloop.judge import judge_batch

        known = {c.code for c in BONE_MARROW_16.classes}
        idx = [i for i, c in enumerate(codes) if c in known]
        judged = judge_batch(
            [images[i] for i in idx], [BONE_MARROW_16.lookup(codes[i]).id for i in idx]
        )
        out: list[Any] = [None] * len(images)
        for i, v in zip(idx, judged, strict=True):
            out[i] = v
        return out


def default_vocab() -> Vocabulary:
    """Classes for scoring when no diffusion model is served: the 16 bone-marrow classes."""
    return BONE_MARROW_16
