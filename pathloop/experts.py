"""Feedback sources behind one signature: the phantom judge, an MLLM with a checklist, people.

An evaluator is a callable ``(images, class_ids, vocab) -> list[EvalVerdict]`` with a ``kind``
(judge / mllm / human) and a ``rater_name`` under which ``evaluate_round`` stores its verdicts.
``EVALUATORS`` maps names to factories; ``get_evaluator(name, **options)`` builds one.

The ``mllm`` evaluator follows MAGIC (Wang et al. 2025): a multimodal LLM answers an expert
checklist of yes/no questions about each image; every question names one of the 7 criteria of
Sun et al. 2023, and an image fails the criteria whose questions got the wrong answer.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pathloop.config import Frozen, updated
from pathloop.vocab import BONE_MARROW_16, CRITERIA, ClassInfo, Vocabulary

if TYPE_CHECKING:
    from openai import OpenAI

    from pathloop.feedback import FeedbackStore

log = logging.getLogger(__name__)

BASE_URL_ENV = "PATHLOOP_MLLM_BASE_URL"
DEFAULT_CHECKLIST = Path(__file__).parent / "checklists" / "bone_marrow.yaml"


class EvalVerdict(BaseModel):
    """One evaluator's decision on one image for its declared class."""

    model_config = ConfigDict(frozen=True)

    plausible: bool | None = Field(description="None = unscored (see reason).")
    failed_criteria: tuple[str, ...] = Field((), description="Failed criteria, CRITERIA order.")
    subtype: str | None = Field(None, description="Subtype read from the image, if any.")
    scores: dict[str, float] = Field(
        default_factory=dict, description="Criterion -> pass score in [0, 1] (averaged votes)."
    )
    reason: str = Field("", description="Why unscored, or what went partly wrong.")
    usage: dict[str, int] = Field(default_factory=dict, description="Tokens and requests spent.")


class Evaluator(Protocol):
    """What ``EVALUATORS`` factories return."""

    kind: str  # rater kind and label source in the feedback store: judge, mllm or human
    rater_name: str

    def __call__(
        self, images: list[np.ndarray], class_ids: list[int], vocab: Vocabulary
    ) -> list[EvalVerdict]: ...


# ----------------------------------------------------------------------------- judge


class JudgeEvaluator:
    """The pixel-level phantom judge (``judge.judge_batch``) as an evaluator.

    The judge knows the classes of BONE_MARROW_16; other vocabularies are matched by class code,
    and images of classes it does not know come back unscored. ``expert`` names its profile
    (``judge.EXPERTS``); the rater is "judge", or "judge:<expert>" for another profile.
    """

    kind = "judge"

    def __init__(self, rater_name: str | None = None, expert: str = "default") -> None:
        from pathloop.judge import check_expert

        self.expert = check_expert(expert)
        self.rater_name = rater_name or ("judge" if expert == "default" else f"judge:{expert}")

    def __call__(
        self, images: list[np.ndarray], class_ids: list[int], vocab: Vocabulary
    ) -> list[EvalVerdict]:
        from pathloop.judge import judge_batch

        codes = {c.code for c in BONE_MARROW_16.classes}
        infos = [vocab.lookup(int(c)) for c in class_ids]
        known = [i for i, info in enumerate(infos) if info.code in codes]
        judged = judge_batch(
            [images[i] for i in known],
            [BONE_MARROW_16.lookup(infos[i].code).id for i in known],
            self.expert,
        )
        out = [
            EvalVerdict(plausible=None, reason=f"the judge knows no class {info.code!r}")
            for info in infos
        ]
        for i, v in zip(known, judged, strict=True):
            out[i] = EvalVerdict(
                plausible=bool(v.plausible),
                failed_criteria=tuple(v.failed),
                subtype=v.subtype,
                scores={c: float(v.criteria[c]) for c in CRITERIA},
            )
        return out


# ----------------------------------------------------------------------------- human


class HumanEvaluator:
    """People label in the review UI or Label Studio; this evaluator scores nothing itself."""

    kind = "human"
    rater_name = "human"
    reason = "waiting for human labels (review UI or Label Studio)"

    def __call__(
        self, images: list[np.ndarray], class_ids: list[int], vocab: Vocabulary
    ) -> list[EvalVerdict]:
        return [EvalVerdict(plausible=None, reason=self.reason) for _ in images]


# ----------------------------------------------------------------------------- checklist


class ChecklistItem(Frozen):
    """One yes/no question of the expert checklist."""

    criterion: str = Field(description="Which of the 7 criteria the question checks.")
    question: str = Field(min_length=1, description="Asked about the cell in the image.")
    plausible: bool = Field(True, description="The answer a plausible cell gets (yes = True).")

    @field_validator("criterion")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in CRITERIA:
            raise ValueError(f"unknown criterion {value!r}; valid criteria: {', '.join(CRITERIA)}")
        return value


class _ChecklistFile(Frozen):
    version: int = Field(1, description="Checklist format version.")
    classes: dict[str, list[ChecklistItem]] = Field(description="Class code/name -> items.")


def load_checklist(path: str | Path | None = None) -> dict[str, list[ChecklistItem]]:
    """Class code (or name) -> checklist items; defaults to the packaged bone-marrow checklist."""
    import yaml

    p = Path(path) if path is not None else DEFAULT_CHECKLIST
    if not p.is_file():
        raise FileNotFoundError(f"checklist {str(p)!r} not found")
    try:
        parsed = _ChecklistFile.model_validate(yaml.safe_load(p.read_text()) or {})
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ValueError(f"invalid checklist {p}:\n" + "\n".join(lines)) from None
    empty = [k for k, items in parsed.classes.items() if not items]
    if empty:
        raise ValueError(f"invalid checklist {p}: classes without items: {empty}")
    return dict(parsed.classes)


def checklist_for(
    checklist: dict[str, list[ChecklistItem]], info: ClassInfo
) -> list[ChecklistItem]:
    """The items of a class, found by code, else by name (case-insensitive); [] when absent."""
    by_key = {k.lower(): v for k, v in checklist.items()}
    return by_key.get(info.code.lower()) or by_key.get(info.name.lower()) or []


# ----------------------------------------------------------------------------- MLLM config


class MLLMConfig(Frozen):
    """The MLLM checklist evaluator (MAGIC): where to ask, what, and how hard to try."""

    base_url: str | None = Field(
        None,
        description=f"OpenAI-compatible API root (e.g. http://host:8000/v1); None = "
        f"${BASE_URL_ENV}, read when the evaluator runs; unset too = refused, unless "
        "allow_public_api.",
    )
    allow_public_api: bool = Field(
        False,
        description="With no base URL, send the images to the OpenAI client's default public "
        "API; off, the evaluator refuses to run rather than let images leave the machine.",
    )
    model: str | None = Field(
        None, description="Model name sent to the API; required (or `models`)."
    )
    models: tuple[str, ...] | None = Field(
        None,
        description="Several models asked the same checklist, averaged like raters; "
        "None = just `model`.",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="NAME of the env var holding the API key (never the key)."
    )
    checklist: str | None = Field(
        None, description="Checklist YAML; None = the packaged bone_marrow.yaml."
    )
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(30.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(
        3,
        ge=0,
        description="Retries after the first try: the OpenAI client's own (timeouts, "
        "connection errors, 408/409/429/5xx, exponential back-off from 0.5 s with jitter, "
        "Retry-After honoured), and as many re-asks on a malformed reply; then the query "
        "counts as unanswered.",
    )
    repeats: int = Field(1, ge=1, description="Times each model is asked per image (votes).")
    threshold: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Fraction of checklist items that must pass for plausible; "
        "1.0 = all, the rule of Sun et al. (one failed criterion makes a cell implausible).",
    )
    image_px: int = Field(
        256, ge=8, description="Images are upscaled (nearest, integer factor) to about this side."
    )
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(200, ge=1, description="Reply length limit in tokens.")

    @property
    def model_list(self) -> tuple[str, ...]:
        return self.models or (self.model,)


# ----------------------------------------------------------------------------- prompt and reply

SYSTEM_PROMPT = (
    "You are an experienced haematopathologist reviewing single-cell images from Wright-Giemsa "
    "stained bone-marrow smears. You answer checklist questions about the cell in the centre of "
    "the image strictly and only in the requested format."
)


def encode_image(image: np.ndarray, image_px: int = 256) -> str:
    """PNG data URI of ``image`` upscaled by an integer factor (nearest) to about ``image_px``."""
    from pathloop.data import encode_png

    k = max(1, image_px // max(image.shape[:2]))
    big = np.repeat(np.repeat(np.asarray(image, dtype=np.uint8), k, axis=0), k, axis=1)
    return "data:image/png;base64," + base64.b64encode(encode_png(big)).decode("ascii")


def build_messages(info: ClassInfo, items: Sequence[ChecklistItem], image_uri: str) -> list[dict]:
    """Chat messages: system text, then the class, its checklist and the image."""
    questions = "\n".join(f"{i}. {item.question}" for i, item in enumerate(items, 1))
    example = json.dumps([1, 0] * (len(items) // 2) + [1] * (len(items) % 2))
    text = (
        f"The image should show one {info.name} (class {info.code}).\n"
        f"Expected appearance: {info.description or 'not given'}\n\n"
        f"Answer each question about the cell with 1 (yes) or 0 (no):\n{questions}\n\n"
        f"Reply with ONLY a JSON list of {len(items)} integers, each 0 or 1, one per question "
        f"in order, e.g. {example}. No other text."
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": image_uri}},
            ],
        },
    ]


class MalformedReply(ValueError):
    """The model's reply was not a JSON list of n zeros and ones."""


_LIST = re.compile(r"\[[^\[\]]*\]")  # the first flat [...]: answers never nest


def parse_answers(text: str | None, n: int) -> list[int]:
    """The 0/1 answers in a reply; code fences and chatter around the list are ignored."""
    if not text or not text.strip():
        raise MalformedReply("empty reply")
    body = re.sub(r"```[a-zA-Z]*", "", text)
    match = _LIST.search(body)
    if match is None:
        raise MalformedReply(f"no JSON list in reply {text[:80]!r}")
    try:
        values = json.loads(match.group(0))
    except json.JSONDecodeError:
        raise MalformedReply(f"not valid JSON: {match.group(0)[:80]!r}") from None
    if len(values) != n:
        raise MalformedReply(f"expected {n} answers, got {len(values)}")
    if not all(isinstance(v, int | float) and v in (0, 1) for v in values):
        raise MalformedReply(f"answers must be 0 or 1, got {values}")
    return [int(v) for v in values]


def score_answers(
    items: Sequence[ChecklistItem], answers: Sequence[Sequence[int]], threshold: float
) -> EvalVerdict:
    """Combine the answers of several queries (models x repeats) to the same checklist.

    An item passes when a strict majority of queries gave the plausible answer (a tie fails:
    the conservative side). ``scores`` holds the mean pass rate per criterion; the image is
    plausible when at least ``threshold`` of the items pass.
    """
    votes = np.asarray(answers, dtype=np.float64)  # (Q, I) 1 = yes
    expect = np.array([item.plausible for item in items], dtype=bool)  # (I,)
    pass_rate = np.where(expect, votes.mean(axis=0), 1.0 - votes.mean(axis=0))  # (I,)
    passed = pass_rate > 0.5
    crit = [item.criterion for item in items]
    scores = {
        c: float(pass_rate[[k for k, x in enumerate(crit) if x == c]].mean())
        for c in CRITERIA
        if c in crit
    }
    failed = tuple(c for c in CRITERIA if any(not passed[k] for k, x in enumerate(crit) if x == c))
    return EvalVerdict(
        plausible=bool(passed.mean() >= threshold - 1e-9), failed_criteria=failed, scores=scores
    )


# ----------------------------------------------------------------------------- MLLM calls


class MLLMError(RuntimeError):
    """A request the evaluator cannot recover from (bad key, unknown model or URL)."""


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret and len(secret) >= 4 else text


@dataclass
class _Answer:
    answers: list[int] | None
    reason: str
    usage: Counter


def _error_kinds() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(errors left once the client's retries are spent, errors that stop the whole run)."""
    import openai

    retry = (
        openai.APITimeoutError,
        openai.APIConnectionError,
        openai.RateLimitError,
        openai.InternalServerError,
        openai.ConflictError,
    )
    fatal = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)
    return retry, fatal


def _add_usage(total: Counter, usage: Any) -> None:
    total["requests"] += 1
    if usage is not None:
        total["prompt_tokens"] += int(getattr(usage, "prompt_tokens", 0) or 0)
        total["completion_tokens"] += int(getattr(usage, "completion_tokens", 0) or 0)


def endpoint(cfg: MLLMConfig) -> str | None:
    """The API root the images go to: ``base_url``, else $PATHLOOP_MLLM_BASE_URL, else None
    (the client's public default) only with ``allow_public_api``. Raises ``MLLMError`` without
    a model name, or without an endpoint and the opt-in."""
    if not cfg.model_list or not all(cfg.model_list):
        raise MLLMError("the mllm evaluator needs a model name: set model= (--model)")
    url = cfg.base_url or os.environ.get(BASE_URL_ENV) or None
    if url is None and not cfg.allow_public_api:
        raise MLLMError(
            f"the mllm evaluator has no base URL (base_url=, --base-url or ${BASE_URL_ENV}) and "
            "would send the images off this machine to the public OpenAI API; name your "
            "endpoint, or pass allow_public_api=True (--allow-public-api) to send them there"
        )
    return url


class MLLMEvaluator:
    """Ask an OpenAI-compatible multimodal model the class's checklist about each image.

    Each (image, model, repeat) is one chat completion, at most ``concurrency`` in flight.
    Timeouts, connection errors and 429/5xx are retried by the OpenAI client (``max_retries``,
    its exponential back-off); a malformed reply is asked again, up to ``max_retries`` times. A
    query still unanswered then is dropped, and an image with no answered query is unscored with
    the reason.
    ``last_usage`` holds the token totals of the latest call.
    """

    kind = "mllm"

    def __init__(self, config: MLLMConfig | dict | None = None, **overrides: Any) -> None:
        base = config.model_dump() if isinstance(config, MLLMConfig) else dict(config or {})
        self.config = MLLMConfig.model_validate({**base, **overrides})
        endpoint(self.config)  # refuse now, before any round is touched
        self.checklist = load_checklist(self.config.checklist)
        self.rater_name = "mllm:" + "+".join(self.config.model_list)
        self.last_usage: dict[str, int] = {}

    def _client(self) -> tuple[OpenAI, str | None]:
        from openai import OpenAI

        cfg = self.config
        key = os.environ.get(cfg.api_key_env)
        if not key:
            log.info("$%s is unset; sending a placeholder API key", cfg.api_key_env)
        base_url = endpoint(cfg)  # checked again: the env var is read when the evaluator runs
        client = OpenAI(
            base_url=base_url,
            api_key=key or "EMPTY",
            timeout=cfg.timeout_s,
            max_retries=cfg.max_retries,  # timeouts, connection errors, 408/409/429/5xx
        )
        return client, key

    def _ask(
        self, client: OpenAI, key: str | None, model: str, messages: list[dict], n: int
    ) -> _Answer:
        cfg, usage, reason = self.config, Counter(), ""
        spent, fatal = _error_kinds()
        for attempt in range(cfg.max_retries + 1):  # re-asks on malformed replies only
            try:
                reply = client.chat.completions.create(
                    model=model,
                    messages=messages,
                    temperature=cfg.temperature,
                    max_tokens=cfg.max_tokens,
                )
                _add_usage(usage, reply.usage)
                text = reply.choices[0].message.content if reply.choices else None
                return _Answer(parse_answers(text, n), "", usage)
            except spent as err:  # the client has retried it max_retries times already
                tries = cfg.max_retries + 1
                reason = f"{type(err).__name__}: {_redact(str(err), key)}"
                return _Answer(None, f"no usable reply after {tries} tries; last: {reason}", usage)
            except MalformedReply as err:
                reason = f"malformed reply: {_redact(str(err), key)}"
            except fatal as err:
                raise MLLMError(
                    f"{model} at {client.base_url}: {type(err).__name__} ({_redact(str(err), key)})"
                ) from None
            except Exception as err:  # e.g. 400 for this one image: do not retry, do not crash
                return _Answer(None, f"{type(err).__name__}: {_redact(str(err), key)}", usage)
            log.warning("%s, attempt %d/%d: %s", model, attempt + 1, cfg.max_retries + 1, reason)
        tries = cfg.max_retries + 1
        return _Answer(None, f"no usable reply after {tries} tries; last: {reason}", usage)

    def __call__(
        self, images: list[np.ndarray], class_ids: list[int], vocab: Vocabulary
    ) -> list[EvalVerdict]:
        cfg = self.config
        infos = [vocab.lookup(int(c)) for c in class_ids]
        items = [checklist_for(self.checklist, info) for info in infos]
        jobs = [
            (i, m)
            for i in range(len(images))
            if items[i]
            for m in cfg.model_list
            for _ in range(cfg.repeats)
        ]
        messages = {
            i: build_messages(infos[i], items[i], encode_image(images[i], cfg.image_px))
            for i in {j for j, _ in jobs}
        }
        client, key = self._client()
        try:
            with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:  # bounds in-flight
                answers = list(
                    pool.map(
                        lambda job: self._ask(
                            client, key, job[1], messages[job[0]], len(items[job[0]])
                        ),
                        jobs,
                    )
                )
        finally:
            client.close()
        per_image: dict[int, list[_Answer]] = {}
        for (i, _), ans in zip(jobs, answers, strict=True):
            per_image.setdefault(i, []).append(ans)
        verdicts = [
            self._verdict(infos[i], items[i], per_image.get(i, [])) for i in range(len(images))
        ]
        total = Counter()
        for v in verdicts:
            total.update(v.usage)
        self.last_usage = dict(total)
        log.info("mllm: %d images, usage %s", len(images), self.last_usage)
        return verdicts

    def _verdict(
        self, info: ClassInfo, items: list[ChecklistItem], answers: list[_Answer]
    ) -> EvalVerdict:
        if not items:
            known = ", ".join(sorted(self.checklist))
            return EvalVerdict(
                plausible=None,
                reason=f"no checklist for class {info.code!r} "
                f"({info.name}); the checklist has: {known}",
            )
        usage = Counter()
        for a in answers:
            usage.update(a.usage)
        good = [a.answers for a in answers if a.answers is not None]
        failures = [a.reason for a in answers if a.answers is None]
        if not good:
            return EvalVerdict(plausible=None, reason=failures[-1], usage=dict(usage))
        verdict = score_answers(items, good, self.config.threshold)
        note = (
            f"{len(failures)} of {len(answers)} queries failed: {failures[-1]}" if failures else ""
        )
        return updated(verdict, reason=note, usage=dict(usage))


# ----------------------------------------------------------------------------- registry

EVALUATORS: dict[str, Callable[..., Evaluator]] = {
    "judge": JudgeEvaluator,
    "mllm": MLLMEvaluator,
    "human": HumanEvaluator,
}


def get_evaluator(name: str, **options: Any) -> Evaluator:
    """Build the evaluator registered as ``name``; an unknown name lists the valid ones."""
    factory = EVALUATORS.get(name)
    if factory is None:
        raise KeyError(f"unknown evaluator {name!r}; valid evaluators: {', '.join(EVALUATORS)}")
    return factory(**options)


# ----------------------------------------------------------------------------- rounds


def _round_batches(store: FeedbackStore, round_id: int, skip: set[str], batch_size: int) -> Any:
    """(ids, images, class ids) batches of the round's images not in ``skip``, shard order."""
    from pathloop.data import iter_records

    wanted = {im.image_id for im in store.images(round_id)} - skip
    samples = store.round_info(round_id).samples_dir
    batch: list[dict] = []
    for rec in iter_records(samples, columns=["id", "image", "class_id"]):
        if rec["id"] in wanted:
            batch.append(rec)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _store_verdict(
    store: FeedbackStore,
    round_id: int,
    rater_id: int,
    image_id: str,
    info: ClassInfo,
    verdict: EvalVerdict,
    source: str,
) -> None:
    from pathloop.feedback_db import FeedbackError, check_subtype

    try:
        subtype = check_subtype(info, verdict.subtype)
    except FeedbackError:
        subtype = None  # the evaluator read a subtype this vocabulary does not record
    store.put_label(
        round_id,
        image_id,
        rater_id,
        verdict.plausible,
        verdict.failed_criteria,
        subtype=subtype,
        comment=verdict.reason,
        source=source,
    )


def evaluate_round(
    store: FeedbackStore,
    round_id: int,
    evaluator_name: str,
    rater_name: str | None = None,
    batch_size: int = 32,
    skip_labelled: bool = True,
    **options: Any,
) -> dict:
    """Score a round's images with an evaluator and store the verdicts as its labels.

    The rater is ``rater_name`` or the evaluator's own (``judge``, ``mllm:<model>``); unscored
    verdicts are stored as plausible=None with the reason as comment. ``skip_labelled`` skips
    images this rater already scored, so a rerun resumes. The ``human`` evaluator stores
    nothing and reports that the round waits for labels. Returns counts.
    """
    evaluator = get_evaluator(evaluator_name, **options)
    if evaluator.kind == "human":
        return _waiting_report(store, round_id, evaluator_name)
    name = rater_name or evaluator.rater_name
    rater_id = store.ensure_rater(name, kind=evaluator.kind)
    vocab = store.vocabulary(round_id)
    scored = {lab.image_id for lab in store.labels(round_id, rater_id) if lab.plausible is not None}
    done = scored if skip_labelled else set()
    counts, usage = Counter(), Counter()
    for batch in _round_batches(store, round_id, done, batch_size):
        class_ids = [int(r["class_id"]) for r in batch]
        verdicts = evaluator([r["image"] for r in batch], class_ids, vocab)
        for rec, cid, v in zip(batch, class_ids, verdicts, strict=True):
            info = vocab.lookup(cid)
            _store_verdict(store, round_id, rater_id, rec["id"], info, v, evaluator.kind)
            counts["n_scored" if v.plausible is not None else "n_unscored"] += 1
            counts["n_plausible"] += int(bool(v.plausible))
            usage.update(v.usage)
    return {
        "round_id": round_id,
        "evaluator": evaluator_name,
        "rater": name,
        "rater_id": rater_id,
        "status": "done",
        "n_images": store.round_info(round_id).n_images,
        "n_skipped": len(done),
        "n_scored": counts["n_scored"],
        "n_unscored": counts["n_unscored"],
        "n_plausible": counts["n_plausible"],
        "usage": dict(usage),
    }


def _waiting_report(store: FeedbackStore, round_id: int, evaluator_name: str) -> dict:
    """People label through the UI; report how far they are instead of scoring."""
    labelled = {
        lab.image_id
        for lab in store.labels(round_id)
        if lab.source == "human" and lab.plausible is not None
    }
    return {
        "round_id": round_id,
        "evaluator": evaluator_name,
        "status": "waiting_for_labels",
        "n_images": store.round_info(round_id).n_images,
        "n_labelled": len(labelled),
    }
