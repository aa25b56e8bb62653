"""The HTTP API (FastAPI): the app builder, health, auth, metrics, and the model routes.

``build_api(args, backend)`` builds the app inside a running process: in a Ray Serve ingress
replica (``serve.app``) the backend forwards to the Generator and Scorer deployments; behind plain
uvicorn (``LocalBackend``) it calls the same cores in-process. The routes are the same code.
The review routes and UI are ``serve.review``'s; error bodies and codes are ``serve.errors``';
what a request may contain is ``serve.inputs``', how much a client may ask ``serve.limits``'.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pathloop import schemas as S
from pathloop.vocab import ClassInfo, Vocabulary
from serve.args import ServeArgs
from serve.errors import (
    ERRORS,
    UNAUTH,
    InputError,
    error_response,
    input_errors,
    install_error_handlers,
)
from serve.inputs import IMAGE_TYPES, GenerateRequest, ScoreRequest, json_only, upload_image
from serve.limits import ClientSlots, check_generate, client_key
from serve.models import ImageTooLarge, decode_image, default_vocab, fit_size
from serve.review import Review, criteria_info, review_routes, ui_routes

JSON_SLACK = 64 * 1024  # JSON/multipart framing allowed on top of the image's base64


class Backend(Protocol):
    """Where the models live: Serve deployment handles or in-process cores."""

    has_generator: bool
    has_scorer: bool

    async def info(self) -> dict | None: ...  # generator's model info, None without one
    async def generate(self, job: dict) -> list[bytes]: ...  # PNG bytes per image
    async def score(self, image: np.ndarray, class_id: int, code: str) -> dict: ...
    async def ready(self) -> dict[str, bool]: ...


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
            return await error_response(413, msg)(scope, receive, send)
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


# ----------------------------------------------------------------------------- the app


class _State:
    """What the routes share; built once per process (replica) by ``build_api``."""

    def __init__(self, args: ServeArgs, backend: Backend, info: dict | None) -> None:
        self.args, self.backend, self.info = args, backend, info
        self.vocab = Vocabulary.model_validate(info["vocab"]) if info else default_vocab()
        self.tokens = args.tokens()
        self.review = Review(args) if args.feedback_url else None
        from pathloop.judge import JUDGE_SIZE

        self.slots = ClientSlots(args.limits.max_concurrent_per_client)
        self.model_ref = public_ref(info["model_uri"]) if info else None
        self.image_size = args.image_size or (int(info["sample_size"]) if info else JUDGE_SIZE)
        self.docs = args.docs if args.docs != "auto" else ("token" if self.tokens else "open")

    def lookup(self, class_name: str) -> ClassInfo:
        with input_errors():
            return self.vocab.lookup(class_name)


_api_bearer = HTTPBearer(auto_error=False, scheme_name="api_token")


def build_api(args: ServeArgs, backend: Backend, info: dict | None) -> FastAPI:
    """The FastAPI app over ``backend``; opens the feedback store and review round now."""
    st = _State(args, backend, info)
    docs = st.docs == "open"  # "token": /openapi.json behind the API token (_ops_routes)
    app = FastAPI(
        title="pathloop",
        version="1",
        description="Class-conditional diffusion of cell images with expert feedback: generate, "
        "score, and review (pathologist-in-the-loop). Review UI at /review.",
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    install_error_handlers(app)
    _ops_routes(app, st)
    _model_routes(app, st)
    _score_routes(app, st)
    review_routes(app, st.review, args.route_prefix)
    ui_routes(app)
    app.add_middleware(BodyLimit, limit=args.limits.max_image_bytes * 4 // 3 + JSON_SLACK)
    app.add_middleware(Metrics)
    return app


def _api_auth(st: _State) -> Any:
    def check(cred: HTTPAuthorizationCredentials | None = Depends(_api_bearer)) -> None:
        if not st.tokens:
            return
        token = cred.credentials if cred else ""
        if not any(hmac.compare_digest(token.encode(), t.encode()) for t in st.tokens):
            detail = (
                "wrong API token: send one of the server's api_tokens"
                if token
                else "missing API token: send Authorization: Bearer <token>"
            )
            raise HTTPException(401, detail, headers=UNAUTH)

    return check


def _client_slot(st: _State) -> Any:
    """Dependency of the model routes: one of the client's in-flight slots (429 when none)."""

    async def hold(request: Request) -> AsyncIterator[None]:
        with st.slots.hold(client_key(request, st.tokens)):
            yield

    return hold


def public_ref(ref: str) -> str:
    """A model reference fit for clients, without the server's absolute paths: URIs as given,
    paths relative to the working directory, else the last name and a hash of the whole path."""
    parts = urlsplit(ref)
    if parts.scheme and parts.scheme != "file" and len(parts.scheme) > 1:  # C: is a drive
        return ref  # models:/name/1, runs:/id/model, s3://bucket/key
    path = Path(parts.path if parts.scheme == "file" else ref).expanduser()
    if path.is_absolute():
        try:
            path = path.relative_to(Path.cwd())
        except ValueError:
            digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
            return f"{path.name}@{digest}"
    if ".." in path.parts:
        return f"{path.name}@{hashlib.sha256(ref.encode()).hexdigest()[:12]}"
    return path.as_posix()


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

    if st.docs == "token":

        @app.get("/openapi.json", name="openapi", include_in_schema=False)
        def openapi(_: None = Depends(_api_auth(st))) -> JSONResponse:
            """The OpenAPI schema, for holders of an API token (ServeArgs.docs)."""
            return JSONResponse(app.openapi())


# ----------------------------------------------------------------------------- model routes


def class_out(c: ClassInfo) -> S.ClassOut:
    return S.ClassOut(
        id=c.id, name=c.name, code=c.code, description=c.description, subtypes=list(c.subtypes)
    )


def _model_routes(app: FastAPI, st: _State) -> None:
    auth, slot = Depends(_api_auth(st)), Depends(_client_slot(st))

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
        dependencies=[auth, slot, Depends(json_only)],
        responses={**ERRORS, 200: png},
    )
    async def generate(req: GenerateRequest) -> Any:
        """Draw ``n`` images of a class. ``format: png`` with ``n == 1`` answers ``image/png``
        (provenance in ``X-Pathloop-*`` headers); otherwise JSON with base64 PNGs.
        Concurrent requests with equal sampler/steps/guidance share one batched sampling call."""
        if not st.backend.has_generator or st.info is None:
            raise HTTPException(503, "no diffusion model is served: set model in the Serve config")
        check_generate(req.n, req.steps, st.args.limits)
        cls = st.lookup(req.class_name)
        job = req.model_dump(include={"n", "sampler", "steps", "guidance", "seed"})
        pngs = await st.backend.generate({**job, "class_id": cls.id})
        prov = {k: job[k] for k in ("sampler", "steps", "guidance")}
        prov.update(model_uri=st.model_ref, checkpoint_step=st.info["checkpoint_step"])
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
    auth, slot = Depends(_api_auth(st)), Depends(_client_slot(st))

    async def score(raw: bytes, class_name: str, resize: bool) -> S.ScoreResponse:
        if not st.backend.has_scorer:
            raise HTTPException(
                503, "no scorer is served: set reward_model or judge: true in the Serve config"
            )
        cls = st.lookup(class_name)
        lim = st.args.limits
        image = decode_image(raw, lim.max_image_bytes, lim.max_side)  # (H, W, 3) uint8
        image = fit_size(image, st.image_size, resize)  # (S, S, 3)
        out = await st.backend.score(image, cls.id, cls.code)
        return S.ScoreResponse(class_name=cls.name, **out)

    @app.post(
        "/v1/score",
        response_model=S.ScoreResponse,
        name="score_image",
        tags=["model"],
        dependencies=[auth, slot, Depends(json_only)],
        responses=ERRORS,
    )
    async def score_json(req: ScoreRequest) -> S.ScoreResponse:
        """Score one image (base64 PNG/JPEG of the scorer's size, or any size with ``resize``)
        for its declared class: reward and/or judge."""
        limit = st.args.limits.max_image_bytes
        if len(req.image_b64) > limit * 4 // 3 + 4:
            raise ImageTooLarge(f"image is over {limit} bytes: send a smaller PNG or JPEG")
        try:
            raw = base64.b64decode(req.image_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("image_b64 is not valid base64: send the image bytes base64") from None
        return await score(raw, req.class_name, req.resize)

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
                },
                "encoding": {"file": {"contentType": ", ".join(IMAGE_TYPES)}},
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
        dependencies=[auth, slot],
        responses=ERRORS,
        openapi_extra={"requestBody": upload_body},
    )
    async def score_upload(
        request: Request,
        class_name: str | None = Query(None, max_length=200, description="Declared class."),
        resize: bool = Query(False, description="Centre-crop and resize to the scorer's size."),
    ) -> S.ScoreResponse:
        """Score a raw PNG/JPEG body, or a multipart form with an image ``file`` (and
        ``class_name``); other content types are 415."""
        body = await request.body()  # BodyLimit has capped it
        image, form_class = upload_image(request.headers.get("content-type", ""), body)
        class_name = class_name or form_class
        if not class_name:
            raise InputError("class_name is required: add ?class_name=... or a form field")
        if not image:
            raise InputError("no image: send PNG/JPEG bytes or a multipart 'file' part")
        return await score(image, class_name, resize)


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
