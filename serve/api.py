"""The HTTP API (FastAPI): the app builder, health, auth, metrics, and the model routes.

``build_api(args, backend)`` builds the app inside a running process: in a Ray Serve ingress
replica (``serve.app``) the backend forwards to the Generator and Scorer deployments; behind plain
uvicorn (``LocalBackend``) it calls the same cores in-process. The routes are the same code.
One Generator serves several models (``ServeArgs.models``, registered versions): a request names
one with ``model``, GET /v1/models lists them; /v1/score/batch scores many images in one call.
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
from collections import OrderedDict
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
from serve.args import DEFAULT_MODEL, ServeArgs
from serve.errors import (
    ERRORS,
    UNAUTH,
    InputError,
    error_response,
    input_errors,
    install_error_handlers,
)
from serve.inputs import (
    IMAGE_TYPES,
    GenerateRequest,
    ScoreRequest,
    json_only,
    upload_image,
    upload_images,
)
from serve.limits import ClientSlots, check_generate, client_key
from serve.models import (
    BadImage,
    ImageTooLarge,
    ModelCache,
    decode_image,
    default_vocab,
    fit_size,
    named_models,
    served_model,
)
from serve.review import Review, criteria_info, review_routes, ui_routes

JSON_SLACK = 64 * 1024  # JSON/multipart framing allowed on top of the image's base64
BATCH_ROUTES = ("/v1/score/batch", "/v1/score/batch/upload")  # bodies up to max_batch_bytes
INFO_CACHE = 256  # model infos (vocabulary, step) the ingress keeps, by model id


class Backend(Protocol):
    """Where the models live: Serve deployment handles or in-process cores."""

    has_generator: bool
    has_scorer: bool

    async def info(self, model: str) -> dict: ...  # a served model's info (loads it)
    async def generate(self, job: dict, model: str) -> list[bytes]: ...  # PNG bytes per image
    async def score(self, image: np.ndarray, class_id: int, code: str) -> dict: ...
    async def score_many(self, items: list[tuple[np.ndarray, int, str]]) -> list[dict]: ...
    async def ready(self) -> dict[str, bool]: ...


# ----------------------------------------------------------------------------- middleware


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes (declared or streamed);
    paths ending in one of ``wider``'s keys may send that many instead (batch routes)."""

    def __init__(self, app: Any, limit: int, wider: dict[str, int] | None = None) -> None:
        self.app, self.limit, self.wider = app, limit, wider or {}

    def _limit(self, path: str) -> int:
        return next((n for p, n in self.wider.items() if path.endswith(p)), self.limit)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            msg = f"request body is {int(declared)} bytes; the limit is {limit}"
            return await error_response(413, msg)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # FastAPI re-raises HTTPException from body reading
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
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
        # served model id -> (info, vocabulary), most recently used last; the default is known
        self.infos: OrderedDict[str, tuple[dict, Vocabulary]] = OrderedDict()
        if info:
            self.infos[info.get("model", DEFAULT_MODEL)] = (info, self.vocab)
        self.tokens = args.tokens()
        self.review = Review(args) if args.feedback_url else None
        from pathloop.judge import JUDGE_SIZE

        self.slots = ClientSlots(args.limits.max_concurrent_per_client)
        self.model_ref = public_ref(info["model_uri"]) if info else None
        self.image_size = args.image_size or (int(info["sample_size"]) if info else JUDGE_SIZE)
        self.docs = args.docs if args.docs != "auto" else ("token" if self.tokens else "open")

    def lookup(self, class_name: str, vocab: Vocabulary | None = None) -> ClassInfo:
        with input_errors():
            return (vocab or self.vocab).lookup(class_name)

    async def model(self, requested: str | None) -> tuple[str, dict, Vocabulary]:
        """(model id, its info, its vocabulary) of a request's ``model``: 422 for one not
        served, 404 for a registered version that is not in the store."""
        with input_errors():
            model_id = served_model(self.args, requested)
        if model_id in self.infos:
            self.infos.move_to_end(model_id)
            return model_id, *self.infos[model_id]
        try:
            info = await self.backend.info(model_id)  # loads it (in some Generator replica)
        except FileNotFoundError as err:
            raise HTTPException(404, f"{model_id}: {err}; GET /v1/models lists them") from None
        self.infos[model_id] = (info, Vocabulary.model_validate(info["vocab"]))
        while len(self.infos) > INFO_CACHE:
            self.infos.popitem(last=False)
        return model_id, *self.infos[model_id]


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
    lim = args.limits
    wider = dict.fromkeys(BATCH_ROUTES, lim.max_batch_bytes)
    app.add_middleware(BodyLimit, limit=lim.max_image_bytes * 4 // 3 + JSON_SLACK, wider=wider)
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
        """Draw ``n`` images of a class from the served model ``model`` names (GET /v1/models;
        None = the default). ``format: png`` with ``n == 1`` answers ``image/png``
        (provenance in ``X-Pathloop-*`` headers); otherwise JSON with base64 PNGs.
        Concurrent requests for one model with equal sampler settings share one batched
        sampling call. ``guide`` names a second served model (autoguidance)."""
        if not st.backend.has_generator or st.info is None:
            raise HTTPException(503, "no diffusion model is served: set model in the Serve config")
        check_generate(req.n, req.steps, st.args.limits)
        model_id, info, vocab = await st.model(req.model)
        cls = st.lookup(req.class_name, vocab)
        job = req.model_dump(include={"n", *SAMPLING_KEYS, "seed"} - {"guide", "guide_weights"})
        job["guide"] = await _guide(st, req.guide, info, vocab)
        job["guide_weights"] = (req.guide_weights or req.weights) if job["guide"] else None
        pngs = await st.backend.generate({**job, "class_id": cls.id}, model_id)
        prov = {k: job[k] for k in SAMPLING_KEYS}
        prov.update(
            model=model_id,
            model_uri=public_ref(info["model_uri"]),
            checkpoint_step=info["checkpoint_step"],
        )
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

    @app.get(
        "/v1/models",
        response_model=S.ModelsResponse,
        name="list_models",
        tags=["model"],
        dependencies=[auth],
        responses=ERRORS,
    )
    async def list_models() -> S.ModelsResponse:
        """The diffusion models /v1/generate serves (``model``): the configured ones and the
        versions of the registered names in the server's MLflow store."""
        args = st.args
        out = [
            S.ModelOut(id=k, kind="named", reference=public_ref(ref), default=k == DEFAULT_MODEL)
            for k, ref in named_models(args).items()
        ]
        if args.registered_models:
            try:
                versions = await asyncio.to_thread(registered_versions, args)
            except Exception as err:  # the store is down or unreachable: say so, not 500
                raise HTTPException(503, f"cannot list registered models: {err}") from None
            out += [S.ModelOut(id=uri, kind="registered", reference=uri) for uri in versions]
        return S.ModelsResponse(
            models=out,
            registered_names=list(args.registered_models),
            max_loaded_per_replica=args.max_models_per_replica,
        )


# What a generate job fixes for every image of its sampling call (and provenance reports).
SAMPLING_KEYS = (
    *("sampler", "steps", "guidance", "guidance_interval"),
    *("guide", "weights", "guide_weights"),
)


async def _guide(st: _State, guide: str | None, info: dict, vocab: Vocabulary) -> str | None:
    """The served model id of a request's ``guide`` (None: none); 422 unless it has the
    model's classes and image size."""
    if guide is None:
        return None
    guide_id, guide_info, guide_vocab = await st.model(guide)
    if guide_vocab != vocab or guide_info["sample_size"] != info["sample_size"]:
        raise HTTPException(
            422,
            f"guide {guide_id!r} does not fit the model: a guide needs the same classes and "
            "image size (GET /v1/models lists the served models)",
        )
    return guide_id


def registered_versions(args: ServeArgs) -> list[str]:
    """models:/<name>/<version> of every version of ``registered_models`` in the store."""
    import mlflow

    client = mlflow.MlflowClient(args.tracking_uri)
    out = []
    for name in args.registered_models:
        numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        out += [f"models:/{name}/{n}" for n in numbers]
    return out


def _score_routes(app: FastAPI, st: _State) -> None:
    auth, slot = Depends(_api_auth(st)), Depends(_client_slot(st))

    def scorer() -> None:
        if not st.backend.has_scorer:
            raise HTTPException(
                503, "no scorer is served: set reward_model or judge: true in the Serve config"
            )

    def prepared(raw: bytes, class_name: str, resize: bool) -> tuple[np.ndarray, ClassInfo]:
        cls = st.lookup(class_name)
        lim = st.args.limits
        image = decode_image(raw, lim.max_image_bytes, lim.max_side)  # (H, W, 3) uint8
        return fit_size(image, st.image_size, resize), cls  # (S, S, 3)

    async def score(raw: bytes, class_name: str, resize: bool) -> S.ScoreResponse:
        scorer()
        image, cls = prepared(raw, class_name, resize)
        out = await st.backend.score(image, cls.id, cls.code)
        return S.ScoreResponse(class_name=cls.name, **out)

    def batch_size(n: int) -> None:
        cap = st.args.limits.max_score_batch
        if not 1 <= n <= cap:
            raise InputError(f"{n} images: send 1 to {cap} per request (limits.max_score_batch)")

    async def score_batch(items: list[tuple[bytes, str, bool]]) -> S.ScoreBatchResponse:
        """Every image checked first (422/413 naming the item), then one model call."""
        scorer()
        batch_size(len(items))
        ready = []
        for i, item in enumerate(items):
            try:
                ready.append(prepared(*item))
            except (InputError, BadImage, ImageTooLarge) as err:
                raise type(err)(f"image {i}: {err}") from None
        outs = await st.backend.score_many([(x, c.id, c.code) for x, c in ready])
        pairs = zip(ready, outs, strict=True)
        return S.ScoreBatchResponse(
            results=[S.ScoreResponse(class_name=c.name, **o) for (_, c), o in pairs]
        )

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
        return await score(b64_image(req.image_b64), req.class_name, req.resize)

    def b64_image(text: str) -> bytes:
        limit = st.args.limits.max_image_bytes
        if len(text) > limit * 4 // 3 + 4:
            raise ImageTooLarge(f"image is over {limit} bytes: send a smaller PNG or JPEG")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("image_b64 is not valid base64: send the image bytes base64") from None

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

    @app.post(
        "/v1/score/batch",
        response_model=S.ScoreBatchResponse,
        name="score_batch",
        tags=["model"],
        dependencies=[auth, slot, Depends(json_only)],
        responses=ERRORS,
    )
    async def score_batch_json(items: list[ScoreRequest]) -> S.ScoreBatchResponse:
        """Score a JSON list of images (each as /v1/score takes it) in one model call; at most
        ``limits.max_score_batch`` per request. Results come in request order."""
        scorer()
        batch_size(len(items))
        decoded = []
        for i, req in enumerate(items):
            try:
                decoded.append((b64_image(req.image_b64), req.class_name, req.resize))
            except (InputError, ImageTooLarge) as err:
                raise type(err)(f"image {i}: {err}") from None
        return await score_batch(decoded)

    batch_body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "class_name": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "encoding": {"file": {"contentType": ", ".join(IMAGE_TYPES)}},
            },
        },
    }

    @app.post(
        "/v1/score/batch/upload",
        response_model=S.ScoreBatchResponse,
        name="score_batch_upload",
        tags=["model"],
        dependencies=[auth, slot],
        responses=ERRORS,
        openapi_extra={"requestBody": batch_body},
    )
    async def score_batch_upload(
        request: Request,
        class_name: str | None = Query(None, max_length=200, description="Class of every file."),
        resize: bool = Query(False, description="Centre-crop and resize to the scorer's size."),
    ) -> S.ScoreBatchResponse:
        """Score a multipart form with several image ``file`` parts in one model call: one
        ``class_name`` (query or form field) for all, or one ``class_name`` field per file."""
        body = await request.body()  # BodyLimit has capped it at limits.max_batch_bytes
        images, names = upload_images(request.headers.get("content-type", ""), body)
        if class_name:
            names = [class_name]
        if len(names) == 1:
            names = names * len(images)
        if not images or len(names) != len(images):
            raise InputError(
                f"{len(images)} 'file' parts and {len(names)} class names: send one class_name "
                "for all files, or one per file in the same order"
            )
        return await score_batch([(im, n, resize) for im, n in zip(images, names, strict=True)])


# ----------------------------------------------------------------------------- local backend


class LocalBackend:
    """In-process cores (plain uvicorn, tests, the benchmark's peer): no Serve, no batching
    across requests; the served models in a small LRU (``max_models_per_replica``)."""

    def __init__(self, args: ServeArgs) -> None:
        from serve.models import GeneratorCore, ScorerCore

        self.calls: list[dict] = []  # every model's sample() calls, as a replica's stats
        self.models = ModelCache(
            lambda model_id: GeneratorCore(args, model_id, self.calls), args.max_models_per_replica
        )
        # The default model loads now (its info is the app's); the cache alone holds models.
        self.default_info = self.models.get(DEFAULT_MODEL).info() if args.model else None
        self.scorer = ScorerCore(args) if (args.reward_model or args.judge) else None
        self.has_generator = self.default_info is not None
        self.has_scorer = self.scorer is not None
        self.timeout = args.request_timeout_s
        self._lock = asyncio.Lock()  # one model call at a time, as in one replica

    async def info(self, model: str) -> dict:
        return (await asyncio.to_thread(self.models.get, model)).info()

    async def generate(self, job: dict, model: str) -> list[bytes]:
        async with self._lock:
            core = await asyncio.to_thread(self.models.get, model)
            guide = job.get("guide") and await asyncio.to_thread(self.models.get, job["guide"])
            run = asyncio.to_thread(core.run, [job], {job["guide"]: guide} if guide else None)
            return (await asyncio.wait_for(run, self.timeout))[0]

    async def score(self, image: np.ndarray, class_id: int, code: str) -> dict:
        return (await self.score_many([(image, class_id, code)]))[0]

    async def score_many(self, items: list[tuple[np.ndarray, int, str]]) -> list[dict]:
        run = asyncio.to_thread(self.scorer.run, items)
        return await asyncio.wait_for(run, self.timeout)

    async def ready(self) -> dict[str, bool]:
        out = {}
        if self.has_generator:
            out["generator"] = True
        if self.scorer:
            out["scorer"] = True
        return out


def build_local_api(args: ServeArgs) -> FastAPI:
    """The same API over in-process models, for plain uvicorn (``uvicorn --factory``)."""
    backend = LocalBackend(args)
    return build_api(args, backend, backend.default_info)
