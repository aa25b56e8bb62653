"""The HTTP API (FastAPI): model routes, review routes, health, auth, errors and metrics.

``build_api(args, backend)`` builds the app inside a running process: in a Ray Serve ingress
replica (``serve.app``) the backend forwards to the Generator and Scorer deployments; behind plain
uvicorn (``LocalBackend``) it calls the same cores in-process. The routes are the same code.

Errors: every 4xx/5xx body is ``{"detail": "..."}``. Bad input is never a 5xx: unknown class or
image id, criterion or subtype, out-of-range values and undecodable images are 422, oversized
bodies or images 413, missing or wrong tokens 401. 503 means a component is not configured or
not loaded; 504 a model did not answer within ``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.parser
import email.policy
import hmac
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from pathloop import schemas as S
from pathloop.vocab import CRITERIA, CRITERIA_TEXT, ClassInfo, Vocabulary
from serve.args import ServeArgs
from serve.models import BadImage, ImageTooLarge, decode_image, default_vocab

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
RESERVED_KEYS = set("PIU")  # review UI: plausible, implausible, undo
JSON_SLACK = 64 * 1024  # JSON/multipart framing allowed on top of the image's base64


class Backend(Protocol):
    """Where the models live: Serve deployment handles or in-process cores."""

    has_generator: bool
    has_scorer: bool

    async def info(self) -> dict | None: ...  # generator's model info, None without one
    async def generate(self, job: dict) -> list[bytes]: ...  # PNG bytes per image
    async def score(self, image: np.ndarray, class_id: int, code: str) -> dict: ...
    async def ready(self) -> dict[str, bool]: ...


class InputError(ValueError):
    """A library ValueError/KeyError caused by the request's content (HTTP 422)."""


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn ValueError/KeyError raised on request values into InputError (422)."""
    try:
        yield
    except (ValueError, KeyError) as err:
        raise InputError(str(err.args[0]) if err.args else str(err)) from None


def _err(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


# ----------------------------------------------------------------------------- middleware


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            msg = f"request body is {int(declared)} bytes; the limit is {self.limit}"
            return await _err(413, msg)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI re-raises HTTPException from body reading
                raise HTTPException(413, f"request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def _make_metrics() -> tuple[Any, Any]:
    """Ray Serve metrics inside a replica; no-ops elsewhere (plain uvicorn, tests)."""
    try:
        from ray import serve
        from ray.serve.metrics import Counter, Histogram

        serve.get_replica_context()  # raises outside a replica
    except Exception:
        return _NoMetric(), _NoMetric()
    requests = Counter(
        "pathloop_http_requests",
        description="HTTP requests by route name and status code.",
        tag_keys=("handler", "status"),
    )
    latency = Histogram(
        "pathloop_http_latency_s",
        description="HTTP request latency by route name, seconds.",
        boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
        tag_keys=("handler",),
    )
    return requests, latency


class _NoMetric:
    def inc(self, *a: Any, **k: Any) -> None: ...
    def observe(self, *a: Any, **k: Any) -> None: ...


class Metrics:
    """ASGI middleware: request count and latency per route *name* (never paths or tokens)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests, self.latency = _make_metrics()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            name = getattr(scope.get("route"), "name", None) or "unmatched"
            self.requests.inc(tags={"handler": name, "status": str(status[0])})
            self.latency.observe(time.perf_counter() - start, tags={"handler": name})


# ----------------------------------------------------------------------------- errors


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    from pathloop.feedback_db import FeedbackError

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _err(422, _validation_message(err))

    for kind in (FeedbackError, InputError, BadImage):

        @app.exception_handler(kind)
        async def _bad_input(_: Request, err: Exception) -> JSONResponse:
            return _err(422, str(err))

    @app.exception_handler(ImageTooLarge)
    async def _too_large(_: Request, err: ImageTooLarge) -> JSONResponse:
        return _err(413, str(err))

    @app.exception_handler(TimeoutError)
    async def _timeout(_: Request, err: TimeoutError) -> JSONResponse:
        return _err(504, str(err) or "the model did not answer in time")


# ----------------------------------------------------------------------------- review state


def subtype_keys(subtypes: tuple[str, ...] | list[str]) -> list[S.SubtypeKey]:
    """A key per subtype: its first letter not taken by P/I/U or an earlier subtype."""
    used, out = set(RESERVED_KEYS), []
    for sub in subtypes:
        key = next((ch.upper() for ch in sub if ch.isalpha() and ch.upper() not in used), None)
        if key is None:
            continue  # no free letter: recorded through the API only
        used.add(key)
        out.append(S.SubtypeKey(key=key, subtype=sub))
    return out


def _read_pngs(samples_dir: str | Path) -> dict[str, bytes]:
    """{image id: PNG bytes} of a shard set (served as they are, never re-encoded)."""
    import pyarrow.parquet as pq

    from pathloop.data import read_manifest

    d, out = Path(samples_dir), {}
    for shard in read_manifest(d)["shards"]:
        table = pq.read_table(d / shard["file"], columns=["id", "image"])
        out.update(zip(table["id"].to_pylist(), table["image"].to_pylist(), strict=True))
    return out


def _real_examples(shard_dir: str | None, vocab: Vocabulary, k: int) -> dict[str, list[str]]:
    """Up to ``k`` real images (PNG base64) per class of ``vocab``, matched by name or code."""
    import pyarrow.parquet as pq

    from pathloop.data import read_manifest, read_vocab

    if not shard_dir or k == 0:
        return {}
    ours = {key.lower(): c.name for c in vocab.classes for key in (c.name, c.code)}
    theirs = {
        c.id: ours.get(c.name.lower()) or ours.get(c.code.lower())
        for c in read_vocab(shard_dir).classes
    }
    out: dict[str, list[str]] = {c.name: [] for c in vocab.classes}
    d = Path(shard_dir)
    for shard in read_manifest(d)["shards"]:
        table = pq.read_table(d / shard["file"], columns=["image", "class_id"])
        for png, cid in zip(table["image"].to_pylist(), table["class_id"].to_pylist(), strict=True):
            name = theirs.get(cid)
            if name is not None and len(out[name]) < k:
                out[name].append(base64.b64encode(png).decode("ascii"))
    return out


def _round_for(store: Any, samples_dir: str) -> int:
    """The newest open round on ``samples_dir``, else a new one (so restarts resume)."""
    want = str(Path(samples_dir).resolve())
    found = [r.id for r in store.rounds() if r.samples_dir == want and r.status == "open"]
    return max(found) if found else store.create_round(want)


class Review:
    """The review round one ingress serves: store, images, PNGs and real examples."""

    def __init__(self, args: ServeArgs) -> None:
        from pathloop.feedback import FeedbackStore

        self.store = FeedbackStore(args.feedback_url)
        self.round_id = args.review_round or _round_for(self.store, args.review_samples_dir)
        info = self.store.round_info(self.round_id)
        self.round_name = info.name
        self.vocab = self.store.vocabulary(self.round_id)
        self.images = self.store.images(self.round_id)  # review order; fixed for a round
        self.index = {im.image_id: i for i, im in enumerate(self.images)}
        self.pngs = _read_pngs(info.samples_dir)
        self.real = _real_examples(args.real_examples, self.vocab, args.real_examples_per_class)
        self.keys = {c.name: subtype_keys(c.subtypes) for c in self.vocab.classes}
        self._scored: dict[int, set[str]] = {}  # rater id -> scored image ids (see refresh)
        self._lock = threading.Lock()
        log.info("review: round %d (%d images)", self.round_id, len(self.images))

    def position(self, image_id: str) -> int:
        if image_id not in self.index:
            ids = ", ".join(repr(im.image_id) for im in self.images[:3])
            raise InputError(
                f"image {image_id!r} is not in round {self.round_id} ({len(self.images)} "
                f"images; valid ids are the shard ids of its samples, e.g. {ids})"
            )
        return self.index[image_id]

    # FeedbackStore.progress loads every image and label of the round (~0.1 s at 500 images),
    # too slow for each POST under load. Each replica keeps the set of image ids each rater has
    # scored: read from the store on every GET (so it is never stale for long, even with several
    # replicas) and updated from the store's answer on every write.

    def refresh(self, rater_id: int) -> dict[str, Any]:
        """This rater's current labels by image id (from the store); updates the cache."""
        labels = {lab.image_id: lab for lab in self.store.labels(self.round_id, rater_id)}
        with self._lock:
            self._scored[rater_id] = {i for i, lab in labels.items() if lab.plausible is not None}
        return labels

    def update(self, rater_id: int, image_id: str, scored: bool) -> None:
        if rater_id not in self._scored:
            self.refresh(rater_id)
        with self._lock:
            (self._scored[rater_id].add if scored else self._scored[rater_id].discard)(image_id)

    def progress(self, rater_id: int) -> tuple[int, int, str | None]:
        """(scored, images, first unscored id in review order) as FeedbackStore.progress."""
        if rater_id not in self._scored:
            self.refresh(rater_id)
        with self._lock:
            done = set(self._scored[rater_id])
        first = next((im.image_id for im in self.images if im.image_id not in done), None)
        return len(done & self.index.keys()), len(self.images), first


def label_out(lab: Any) -> S.LabelOut:
    return S.LabelOut(
        plausible=lab.plausible,
        failed_criteria=list(lab.failed_criteria),
        subtype=lab.subtype,
        comment=lab.comment,
        revision=lab.revision,
    )


def criteria_info() -> list[S.CriterionInfo]:
    return [
        S.CriterionInfo(key=c, text=CRITERIA_TEXT[c], hotkey=str(i + 1))
        for i, c in enumerate(CRITERIA)
    ]


def class_out(c: ClassInfo) -> S.ClassOut:
    return S.ClassOut(
        id=c.id, name=c.name, code=c.code, description=c.description, subtypes=list(c.subtypes)
    )


# ----------------------------------------------------------------------------- the app


class _State:
    """What the routes share; built once per process (replica) by ``build_api``."""

    def __init__(self, args: ServeArgs, backend: Backend, info: dict | None) -> None:
        self.args, self.backend, self.info = args, backend, info
        self.vocab = Vocabulary.model_validate(info["vocab"]) if info else default_vocab()
        self.tokens = args.tokens()
        self.review = Review(args) if args.feedback_url else None

    def lookup(self, class_name: str) -> ClassInfo:
        with input_errors():
            return self.vocab.lookup(class_name)


_api_bearer = HTTPBearer(auto_error=False, scheme_name="api_token")
_rater_bearer = HTTPBearer(auto_error=False, scheme_name="rater_token")
_UNAUTH = {"WWW-Authenticate": "Bearer"}
ERRORS = {
    401: {"model": S.ErrorResponse, "description": "Missing or wrong bearer token."},
    413: {"model": S.ErrorResponse, "description": "Body or image over the limits."},
    422: {"model": S.ErrorResponse, "description": "Invalid request; the detail says why."},
    503: {"model": S.ErrorResponse, "description": "Component not configured or not loaded."},
    504: {"model": S.ErrorResponse, "description": "The model did not answer in time."},
}


def build_api(args: ServeArgs, backend: Backend, info: dict | None) -> FastAPI:
    """The FastAPI app over ``backend``; opens the feedback store and review round now."""
    st = _State(args, backend, info)
    app = FastAPI(
        title="pathloop",
        version="1",
        description="Class-conditional diffusion of cell images with expert feedback: generate, "
        "score, and review (pathologist-in-the-loop). Review UI at /review.",
    )
    install_error_handlers(app)
    _ops_routes(app, st)
    _model_routes(app, st)
    _score_routes(app, st)
    _review_routes(app, st)
    _ui_routes(app)
    app.add_middleware(BodyLimit, limit=args.limits.max_image_bytes * 4 // 3 + JSON_SLACK)
    app.add_middleware(Metrics)
    return app


def _api_auth(st: _State) -> Any:
    def check(cred: HTTPAuthorizationCredentials | None = Depends(_api_bearer)) -> None:
        if not st.tokens:
            return
        token = cred.credentials if cred else ""
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in st.tokens):
            detail = "wrong API token" if token else "missing API token: send Authorization: Bearer"
            raise HTTPException(401, detail, headers=_UNAUTH)

    return check


def _rater_auth(st: _State) -> Any:
    def check(cred: HTTPAuthorizationCredentials | None = Depends(_rater_bearer)) -> Any:
        rv = _review_of(st)
        if cred is None or not cred.credentials:
            raise HTTPException(
                401, "missing rater token: send Authorization: Bearer <token>", _UNAUTH
            )
        rater = rv.store.rater_for_token(cred.credentials)
        if rater is None:
            raise HTTPException(401, "rater token not recognised", headers=_UNAUTH)
        return rater

    return check


def _review_of(st: _State) -> Review:
    if st.review is None:
        raise HTTPException(503, "review is not configured: set feedback_url and a round")
    return st.review


# ----------------------------------------------------------------------------- ops routes


def _ops_routes(app: FastAPI, st: _State) -> None:
    @app.get("/healthz", response_model=S.HealthResponse, name="healthz", tags=["ops"])
    def healthz() -> S.HealthResponse:
        """Liveness: the HTTP layer answers (no auth)."""
        return S.HealthResponse()

    @app.get(
        "/readyz", response_model=S.ReadyResponse, name="readyz", tags=["ops"], responses=ERRORS
    )
    async def readyz() -> Any:
        """Readiness: every configured model is loaded (503 until then; no auth)."""
        models = await st.backend.ready()
        body = S.ReadyResponse(ready=all(models.values()), models=models)
        return body if body.ready else JSONResponse(body.model_dump(), status_code=503)


# ----------------------------------------------------------------------------- model routes


def _model_routes(app: FastAPI, st: _State) -> None:
    auth = Depends(_api_auth(st))

    @app.get(
        "/v1/classes",
        response_model=S.ClassesResponse,
        name="list_classes",
        tags=["model"],
        dependencies=[auth],
        responses=ERRORS,
    )
    def list_classes() -> S.ClassesResponse:
        """The classes /v1/generate and /v1/score accept, and the 7 criteria."""
        return S.ClassesResponse(
            classes=[class_out(c) for c in st.vocab.classes], criteria=criteria_info()
        )

    png = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}

    @app.post(
        "/v1/generate",
        response_model=S.GenerateResponse,
        name="generate_images",
        tags=["model"],
        dependencies=[auth],
        responses={**ERRORS, 200: png},
    )
    async def generate(req: S.GenerateRequest) -> Any:
        """Draw ``n`` images of a class. ``format: png`` with ``n == 1`` answers ``image/png``
        (provenance in ``X-Pathloop-*`` headers); otherwise JSON with base64 PNGs.
        Concurrent requests with equal sampler/steps/guidance share one batched sampling call."""
        if not st.backend.has_generator or st.info is None:
            raise HTTPException(503, "no diffusion model is configured (ServeArgs.model)")
        lim = st.args.limits
        if req.n > lim.max_n:
            raise InputError(f"n={req.n} is over the limit: 1..{lim.max_n}")
        if req.steps > lim.max_steps:
            raise InputError(f"steps={req.steps} is over the limit: 1..{lim.max_steps}")
        cls = st.lookup(req.class_name)
        job = req.model_dump(include={"n", "sampler", "steps", "guidance", "seed"})
        pngs = await st.backend.generate({**job, "class_id": cls.id})
        prov = {k: job[k] for k in ("sampler", "steps", "guidance")}
        prov.update(model_uri=st.info["model_uri"], checkpoint_step=st.info["checkpoint_step"])
        if req.format == "png" and req.n == 1:
            head = {f"X-Pathloop-{k.replace('_', '-')}": str(v) for k, v in prov.items()}
            head.update({"X-Pathloop-Seed": str(req.seed), "X-Pathloop-Class": cls.name})
            return Response(pngs[0], media_type="image/png", headers=head)
        images = [
            S.GeneratedImage(
                image_b64=base64.b64encode(p).decode("ascii"),
                seed=req.seed + i,
                class_name=cls.name,
                provenance=S.Provenance(**prov, seed=req.seed + i),
            )
            for i, p in enumerate(pngs)
        ]
        return S.GenerateResponse(images=images)


def _score_routes(app: FastAPI, st: _State) -> None:
    auth = Depends(_api_auth(st))

    async def score(raw: bytes, class_name: str) -> S.ScoreResponse:
        if not st.backend.has_scorer:
            raise HTTPException(503, "no scorer is configured (ServeArgs.reward_model or judge)")
        cls = st.lookup(class_name)
        lim = st.args.limits
        image = decode_image(raw, lim.max_image_bytes, lim.max_side)  # (H, W, 3) uint8
        out = await st.backend.score(image, cls.id, cls.code)
        return S.ScoreResponse(class_name=cls.name, **out)

    @app.post(
        "/v1/score",
        response_model=S.ScoreResponse,
        name="score_image",
        tags=["model"],
        dependencies=[auth],
        responses=ERRORS,
    )
    async def score_json(req: S.ScoreRequest) -> S.ScoreResponse:
        """Score one image (base64 PNG/JPEG) for its declared class: reward and/or judge."""
        if len(req.image_b64) > st.args.limits.max_image_bytes * 4 // 3 + 4:
            raise ImageTooLarge(f"image is over {st.args.limits.max_image_bytes} bytes")
        try:
            raw = base64.b64decode(req.image_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("image_b64 is not valid base64") from None
        return await score(raw, req.class_name)

    upload_body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "class_name": {"type": "string"},
                    },
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }

    @app.post(
        "/v1/score/upload",
        response_model=S.ScoreResponse,
        name="score_upload",
        tags=["model"],
        dependencies=[auth],
        responses=ERRORS,
        openapi_extra={"requestBody": upload_body},
    )
    async def score_upload(
        request: Request,
        class_name: str | None = Query(None, max_length=200, description="Declared class."),
    ) -> S.ScoreResponse:
        """Score a raw PNG/JPEG body, or a multipart form with ``file`` (and ``class_name``)."""
        body = await request.body()  # BodyLimit has capped it
        ctype = request.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/form-data"):
            form = parse_multipart(ctype, body)
            body, class_name = form.get("file", b""), class_name or _text(form.get("class_name"))
        if not class_name:
            raise InputError("class_name is required (query parameter or form field)")
        if not body:
            raise InputError("no image: send PNG/JPEG bytes or a multipart 'file' field")
        return await score(body, class_name)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace").strip()


def parse_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """{field name: bytes} of a multipart/form-data body (stdlib email parser; no extra deps)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    try:
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        if not msg.is_multipart():
            raise ValueError("not a multipart body")
        out = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name:
                out[str(name)] = part.get_payload(decode=True) or b""
        return out
    except Exception as err:  # the parser raises many kinds on malformed input
        raise InputError(f"malformed multipart/form-data body: {err}") from None


# ----------------------------------------------------------------------------- review routes


def _review_routes(app: FastAPI, st: _State) -> None:
    rater_dep = Depends(_rater_auth(st))
    tags = ["review"]

    @app.get(
        "/v1/review/meta",
        response_model=S.ReviewMetaResponse,
        name="review_meta",
        tags=tags,
        responses=ERRORS,
    )
    def review_meta(rater: Any = rater_dep) -> S.ReviewMetaResponse:
        """Round, signed-in rater, criteria with their keys, and each class's subtype keys."""
        rv = _review_of(st)
        classes = [
            S.ReviewClass(
                name=c.name, code=c.code, description=c.description, subtypes=rv.keys[c.name]
            )
            for c in rv.vocab.classes
        ]
        return S.ReviewMetaResponse(
            round_id=rv.round_id,
            round_name=rv.round_name,
            rater=rater.name,
            criteria=criteria_info(),
            classes=classes,
        )

    @app.get(
        "/v1/review/next",
        response_model=S.NextResponse,
        name="review_next",
        tags=tags,
        responses=ERRORS,
    )
    def review_next(
        image_id: str | None = Query(None, max_length=64, description="Show this image instead."),
        rater: Any = rater_dep,
    ) -> S.NextResponse:
        """The asked image, else the first this rater has not scored (resume point)."""
        rv = _review_of(st)
        labels = rv.refresh(rater.id)
        done, total, first = rv.progress(rater.id)
        target = image_id or first
        if target is None:
            return S.NextResponse(
                image_id=None,
                position=None,
                class_name=None,
                class_code=None,
                description=None,
                subtypes=[],
                image_b64=None,
                url=None,
                prev_id=None,
                next_id=None,
                label=None,
                done=done,
                total=total,
                real_examples=[],
            )
        lab = labels.get(target)
        return _next_response(st, rv, target, None if lab is None else label_out(lab), done, total)

    @app.post(
        "/v1/review/labels",
        response_model=S.LabelResponse,
        name="review_post_label",
        tags=tags,
        responses=ERRORS,
    )
    def post_label(req: S.LabelRequest, rater: Any = rater_dep) -> S.LabelResponse:
        """Store (upsert) this rater's label; resending the same label changes nothing."""
        rv = _review_of(st)
        lab = rv.store.put_label(
            rv.round_id,
            req.image_id,
            rater.id,
            req.plausible,
            req.failed_criteria,
            subtype=req.subtype,
            comment=req.comment,
            source="human",
        )
        rv.update(rater.id, req.image_id, lab.plausible is not None)
        done, total, nxt = rv.progress(rater.id)
        return S.LabelResponse(
            image_id=req.image_id, label=label_out(lab), done=done, total=total, next_id=nxt
        )

    @app.post(
        "/v1/review/undo",
        response_model=S.UndoResponse,
        name="review_undo",
        tags=tags,
        responses=ERRORS,
    )
    def undo(req: S.UndoRequest, rater: Any = rater_dep) -> S.UndoResponse:
        """Step this rater's label of an image back one revision (none left: no label)."""
        rv = _review_of(st)
        lab = rv.store.undo(rv.round_id, req.image_id, rater.id)
        rv.update(rater.id, req.image_id, lab is not None and lab.plausible is not None)
        done, total, nxt = rv.progress(rater.id)
        return S.UndoResponse(
            image_id=req.image_id,
            label=None if lab is None else label_out(lab),
            done=done,
            total=total,
            next_id=nxt,
        )

    @app.get(
        "/v1/review/progress",
        response_model=S.ProgressResponse,
        name="review_progress",
        tags=tags,
        responses=ERRORS,
    )
    def progress(rater: Any = rater_dep) -> S.ProgressResponse:
        """Images scored by this rater, images in the round, and where to resume."""
        rv = _review_of(st)
        rv.refresh(rater.id)
        done, total, nxt = rv.progress(rater.id)
        return S.ProgressResponse(
            round_id=rv.round_id, rater=rater.name, done=done, total=total, next_id=nxt
        )

    @app.get(
        "/v1/review/image/{image_id}.png",
        name="review_image",
        tags=tags,
        responses={**ERRORS, 404: {"model": S.ErrorResponse}, 200: {"content": {"image/png": {}}}},
        response_class=Response,
    )
    def review_image(image_id: str, rater: Any = rater_dep) -> Response:
        """The PNG of one image of the round (as stored in its shard)."""
        rv = _review_of(st)
        png = rv.pngs.get(image_id)
        if png is None:
            raise HTTPException(404, f"image {image_id!r} is not in round {rv.round_id}")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private"})


def _next_response(
    st: _State, rv: Review, image_id: str, label: S.LabelOut | None, done: int, total: int
) -> S.NextResponse:
    pos = rv.position(image_id)
    img = rv.images[pos]
    info = rv.vocab.lookup(img.class_id)
    png = rv.pngs.get(image_id)
    return S.NextResponse(
        image_id=image_id,
        position=pos,
        class_name=info.name,
        class_code=info.code,
        description=info.description,
        subtypes=rv.keys[info.name],
        image_b64=None if png is None else base64.b64encode(png).decode("ascii"),
        url=f"{st.args.route_prefix.rstrip('/')}/v1/review/image/{image_id}.png",
        prev_id=rv.images[pos - 1].image_id if pos > 0 else None,
        next_id=rv.images[pos + 1].image_id if pos + 1 < len(rv.images) else None,
        label=label,
        done=done,
        total=total,
        real_examples=rv.real.get(info.name, []),
    )


# ----------------------------------------------------------------------------- UI


def _ui_routes(app: FastAPI) -> None:
    @app.get("/review", name="review_ui", include_in_schema=False)
    def review_ui() -> FileResponse:
        return FileResponse(STATIC / "review.html", media_type="text/html")

    @app.get("/", name="root", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("review")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


# ----------------------------------------------------------------------------- local backend


class LocalBackend:
    """In-process cores (plain uvicorn, tests, the benchmark's peer): no Serve, no batching."""

    def __init__(self, args: ServeArgs) -> None:
        from serve.models import GeneratorCore, ScorerCore

        self.generator = GeneratorCore(args) if args.model else None
        self.scorer = ScorerCore(args) if (args.reward_model or args.judge) else None
        self.has_generator, self.has_scorer = self.generator is not None, self.scorer is not None
        self.timeout = args.request_timeout_s
        self._lock = asyncio.Lock()  # one model call at a time, as in one replica

    async def info(self) -> dict | None:
        return self.generator.info() if self.generator else None

    async def generate(self, job: dict) -> list[bytes]:
        async with self._lock:
            run = asyncio.to_thread(self.generator.run, [job])
            return (await asyncio.wait_for(run, self.timeout))[0]

    async def score(self, image: np.ndarray, class_id: int, code: str) -> dict:
        run = asyncio.to_thread(self.scorer.run, [(image, class_id, code)])
        return (await asyncio.wait_for(run, self.timeout))[0]

    async def ready(self) -> dict[str, bool]:
        out = {}
        if self.generator:
            out["generator"] = True
        if self.scorer:
            out["scorer"] = True
        return out


def build_local_api(args: ServeArgs) -> FastAPI:
    """The same API over in-process models, for plain uvicorn (``uvicorn --factory``)."""
    backend = LocalBackend(args)
    info = backend.generator.info() if backend.generator else None
    return build_api(args, backend, info)
