"""What a hostile client may send the HTTP API, in-process (FastAPI TestClient, no Ray, no model).

A fake backend stands in for the models (it returns fixed PNGs and scores and records what it
was given), so each case checks the API layer only: strict JSON types, finite numbers, image
size, content types, per-client and per-request limits, closed docs and provenance without the
server's paths. Every refusal is a 4xx with one line naming the problem and the fix.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

TOKEN, OTHER = "tok-alpha-123", "tok-beta-456"
SIZE = 16  # the fake model's sample_size: the side /v1/score accepts


def png(w: int, h: int) -> bytes:
    from pathloop.data import encode_png

    return encode_png(np.full((h, w, 3), 180, dtype=np.uint8))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class FakeBackend:
    """The Backend protocol without models; ``gate`` (when set) holds every call until opened."""

    has_generator = has_scorer = True

    def __init__(self) -> None:
        self.jobs: list[dict] = []
        self.scored: list[tuple] = []  # image shapes
        self.gate: asyncio.Event | None = None

    async def _wait(self) -> None:
        if self.gate is not None:
            await self.gate.wait()

    async def info(self, model: str) -> dict:
        return info()

    async def generate(self, job: dict, model: str) -> list[bytes]:
        self.jobs.append(job)
        await self._wait()
        return [png(SIZE, SIZE)] * job["n"]

    async def score(self, image: np.ndarray, class_id: int, code: str) -> dict:
        return (await self.score_many([(image, class_id, code)]))[0]

    async def score_many(self, items: list[tuple]) -> list[dict]:
        self.scored += [image.shape for image, _, _ in items]
        await self._wait()
        crit = {"shape": True}
        out = dict(reward=0.5, plausible=True, criteria=crit, failed_criteria=[], subtype=None)
        return [out] * len(items)

    async def ready(self) -> dict[str, bool]:
        return {"generator": True, "scorer": True}


def info(model_uri: str = "/srv/secret/runs/pretrain/checkpoint") -> dict:
    from pathloop.vocab import BONE_MARROW_16

    return {
        "vocab": BONE_MARROW_16.model_dump(mode="json"),
        "model_uri": model_uri,
        "checkpoint_step": 7,
        "sample_size": SIZE,
    }


def make_app(backend: FakeBackend | None = None, model_uri: str | None = None, **args):
    from serve.api import build_api
    from serve.args import ServeArgs

    backend = backend or FakeBackend()
    model_info = info(model_uri) if model_uri else info()
    return build_api(ServeArgs(model="m", judge=True, **args), backend, model_info)


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app(limits={"max_n": 4, "max_steps": 50}))


def one_line_4xx(r, status: int, *needles: str) -> str:
    """The detail of ``r``, checked: ``status``, one line, every needle in it."""
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail, detail
    for needle in needles:
        assert needle in detail, (needle, detail)
    return detail


# ----------------------------------------------------------------------------- strict JSON types


@pytest.mark.parametrize(
    "body, field",
    [
        ({"n": True}, "n"),
        ({"n": "2"}, "n"),
        ({"steps": 2.0}, "steps"),
        ({"seed": False}, "seed"),
        ({"guidance": "2"}, "guidance"),
        ({"guidance": True}, "guidance"),
    ],
)
def test_generate_takes_json_types_as_written(client, body, field):
    r = client.post("/v1/generate", json={"class_name": "M5", **body})
    one_line_4xx(r, 422, f"{field}:", "send a JSON")


def test_review_label_refuses_strings_and_numbers_as_booleans(tmp_path):
    from pathloop.data import ShardWriter
    from pathloop.feedback import FeedbackStore
    from pathloop.vocab import BONE_MARROW_16

    with ShardWriter(tmp_path / "samples", BONE_MARROW_16) as w:
        for i in range(2):
            w.add(np.full((SIZE, SIZE, 3), 100 + i, np.uint8), i, split="none", source="synthetic")
    store = FeedbackStore(tmp_path / "fb.db")
    _, token = store.add_rater("alice")
    app = make_app(
        feedback_url=str(tmp_path / "fb.db"), review_samples_dir=str(tmp_path / "samples")
    )
    rater = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    image_id = rater.get("/v1/review/next").json()["image_id"]
    for bad in ("yes", "false", 1, 0):
        r = rater.post("/v1/review/labels", json={"image_id": image_id, "plausible": bad})
        one_line_4xx(r, 422, "plausible:", "true or false")
    store_round = store.rounds()[-1].id
    assert store.labels(store_round) == []  # nothing was stored from the refused requests
    ok = rater.post("/v1/review/labels", json={"image_id": image_id, "plausible": False})
    assert ok.status_code == 200 and ok.json()["label"]["plausible"] is False


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_by_name(client, value):
    body = f'{{"class_name": "M5", "guidance": {value}}}'.encode()
    r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    one_line_4xx(r, 422, "guidance:", "NaN and infinity")


# ----------------------------------------------------------------------------- image size


@pytest.mark.parametrize("w, h", [(1, 1), (SIZE * 2, SIZE * 2), (SIZE, SIZE + 1), (2048, 8)])
def test_score_refuses_images_of_another_size_naming_the_size(w, h):
    backend = FakeBackend()
    client = TestClient(make_app(backend))
    r = client.post("/v1/score", json={"image_b64": b64(png(w, h)), "class_name": "M5"})
    one_line_4xx(r, 422, f"{w}x{h}", f"{SIZE}x{SIZE}", "resize")
    up = client.post(
        "/v1/score/upload",
        params={"class_name": "M5"},
        content=png(w, h),
        headers={"content-type": "image/png"},
    )
    one_line_4xx(up, 422, f"{SIZE}x{SIZE}")
    assert backend.scored == []
    ok = client.post("/v1/score", json={"image_b64": b64(png(SIZE, SIZE)), "class_name": "M5"})
    assert ok.status_code == 200 and backend.scored == [(SIZE, SIZE, 3)]


def test_score_resizes_when_asked():
    backend = FakeBackend()
    client = TestClient(make_app(backend))
    r = client.post(
        "/v1/score", json={"image_b64": b64(png(40, 24)), "class_name": "M5", "resize": True}
    )
    assert r.status_code == 200, r.text
    up = client.post(
        "/v1/score/upload",
        params={"class_name": "M5", "resize": "true"},
        content=png(3, 5),
        headers={"content-type": "image/png"},
    )
    assert up.status_code == 200, up.text
    assert backend.scored == [(SIZE, SIZE, 3)] * 2
    strict = client.post(
        "/v1/score", json={"image_b64": b64(png(8, 8)), "class_name": "M5", "resize": "yes"}
    )
    one_line_4xx(strict, 422, "resize:")


# ----------------------------------------------------------------------------- content types


@pytest.mark.parametrize(
    "ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_json_routes_take_json_only(client, ctype):
    headers = {} if ctype is None else {"content-type": ctype}
    bodies = {
        "/v1/generate": b'{"class_name": "M5"}',
        "/v1/score": f'{{"class_name": "M5", "image_b64": "{b64(png(SIZE, SIZE))}"}}'.encode(),
    }
    for path, body in bodies.items():
        r = client.post(path, content=body, headers=headers)
        one_line_4xx(r, 415, "Content-Type: application/json")


def test_review_json_routes_take_json_only():
    client = TestClient(make_app())  # no review configured: the content type is refused first
    for path in ("/v1/review/labels", "/v1/review/undo"):
        r = client.post(path, content=b'{"image_id": "x"}', headers={"content-type": "text/plain"})
        one_line_4xx(r, 415, "application/json")


def test_upload_takes_image_types_only():
    backend = FakeBackend()
    client = TestClient(make_app(backend))
    image, q = png(SIZE, SIZE), {"class_name": "M5"}
    for ctype in ("text/plain", "application/octet-stream", "application/x-www-form-urlencoded"):
        r = client.post(
            "/v1/score/upload", params=q, content=image, headers={"content-type": ctype}
        )
        one_line_4xx(r, 415, "image/png or image/jpeg")
    bare = client.post("/v1/score/upload", params=q, content=image)  # no Content-Type at all
    one_line_4xx(bare, 415, "no Content-Type")
    for part_type in ("text/plain", "application/octet-stream"):
        form = client.post("/v1/score/upload", params=q, files={"file": ("x", image, part_type)})
        one_line_4xx(form, 415, "'file' part", "image/png or image/jpeg")
    nofile = client.post("/v1/score/upload", params=q, files={"other": ("x", image, "image/png")})
    one_line_4xx(nofile, 422, "'file'")
    assert backend.scored == []
    ok = client.post("/v1/score/upload", params=q, files={"file": ("x.png", image, "image/png")})
    assert ok.status_code == 200 and backend.scored == [(SIZE, SIZE, 3)]


# ----------------------------------------------------------------------------- limits


def test_batch_bodies_have_their_own_limit_and_one_model_call():
    """/v1/score/batch may send more than one image's worth of body (max_batch_bytes), other
    routes may not; the batch is one backend call."""
    from pathloop.data import encode_png

    backend = FakeBackend()
    limits = {"max_image_bytes": 2048, "max_batch_bytes": 200_000, "max_score_batch": 64}
    c = TestClient(make_app(backend, limits=limits))
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    item = {"image_b64": base64.b64encode(encode_png(noise)).decode(), "class_name": "M5"}
    single = 2048 * 4 // 3 + 64 * 1024  # one image's base64 and framing
    assert 64 * len(item["image_b64"]) > single  # so 64 of them are over a one-image body
    too_big = {**item, "image_b64": "A" * single}
    one_line_4xx(c.post("/v1/score", json=too_big), 413, f"the limit is {single}")
    calls = []
    score_many = backend.score_many
    backend.score_many = lambda items: calls.append(len(items)) or score_many(items)
    r = c.post("/v1/score/batch", json=[item] * 64)
    assert r.status_code == 200 and len(r.json()["results"]) == 64 and calls == [64], r.text
    huge = [{**item, "image_b64": "A" * 2700}] * 64 * 2
    one_line_4xx(c.post("/v1/score/batch", json=huge), 413, "the limit is 200000")


def test_generate_work_is_capped_at_n_times_steps():
    client = TestClient(make_app(limits={"max_n": 4, "max_steps": 50, "max_image_steps": 100}))
    r = client.post("/v1/generate", json={"class_name": "M5", "n": 4, "steps": 26})
    one_line_4xx(r, 422, "4 x 26 = 104", "limits.max_image_steps = 100", "serve/config.yaml")
    r = client.post("/v1/generate", json={"class_name": "M5", "n": 5, "steps": 1})
    one_line_4xx(r, 422, "limits.max_n", "serve/config.yaml")
    r = client.post("/v1/generate", json={"class_name": "M5", "n": 1, "steps": 51})
    one_line_4xx(r, 422, "limits.max_steps", "serve/config.yaml")
    ok = client.post("/v1/generate", json={"class_name": "M5", "n": 4, "steps": 25})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 4


def test_concurrent_requests_per_client_are_capped():
    import httpx

    backend = FakeBackend()
    app = make_app(backend, api_tokens=[TOKEN, OTHER], limits={"max_concurrent_per_client": 2})

    async def main() -> list[int]:
        backend.gate = asyncio.Event()
        transport = httpx.ASGITransport(app=app)
        body = {"class_name": "M5", "n": 1, "steps": 2}

        def client(token: str) -> httpx.AsyncClient:
            auth = {"Authorization": f"Bearer {token}"}
            return httpx.AsyncClient(transport=transport, base_url="http://t", headers=auth)

        async with client(TOKEN) as a, client(OTHER) as b:
            held = [asyncio.create_task(a.post("/v1/generate", json=body)) for _ in range(2)]
            while len(backend.jobs) < 2:  # both of a's requests are in the model
                await asyncio.sleep(0.01)
            third = await a.post("/v1/generate", json=body)
            score = await a.post(
                "/v1/score", json={"image_b64": b64(png(8, 8)), "class_name": "M5"}
            )
            other = asyncio.create_task(b.post("/v1/generate", json=body))  # its own budget
            while len(backend.jobs) < 3:
                await asyncio.sleep(0.01)
            one_line_4xx(third, 429, "limits.max_concurrent_per_client = 2", "serve/config.yaml")
            assert third.headers["retry-after"] == "1" and score.status_code == 429
            backend.gate.set()
            done = [r.status_code for r in await asyncio.gather(*held, other)]
            after = await a.post("/v1/generate", json=body)  # the slots came back
            return [*done, after.status_code]

    assert asyncio.run(main()) == [200, 200, 200, 200]


# ----------------------------------------------------------------------------- docs, provenance


def test_docs_are_closed_when_tokens_are_set():
    closed = TestClient(make_app(api_tokens=[TOKEN]))
    for path in ("/docs", "/redoc"):
        one_line_4xx(closed.get(path), 404, "/openapi.json")
    one_line_4xx(closed.get("/openapi.json"), 401, "API token")
    spec = closed.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert spec.status_code == 200 and "/v1/generate" in spec.json()["paths"]
    off = TestClient(make_app(api_tokens=[TOKEN], docs="off"))
    assert off.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    opened = TestClient(make_app(api_tokens=[TOKEN], docs="open"))
    assert opened.get("/docs").status_code == 200 and opened.get("/openapi.json").status_code == 200
    assert TestClient(make_app()).get("/docs").status_code == 200  # no tokens: open (auto)


def test_provenance_shows_no_server_paths():
    client = TestClient(make_app())  # model_uri /srv/secret/runs/pretrain/checkpoint
    js = client.post("/v1/generate", json={"class_name": "M5", "n": 2, "steps": 2})
    raw = client.post("/v1/generate", json={"class_name": "M5", "steps": 2, "format": "png"})
    assert js.status_code == raw.status_code == 200
    ref = js.json()["images"][0]["provenance"]["model_uri"]
    assert "/srv" not in js.text and "/srv" not in str(raw.headers)
    assert ref.startswith("checkpoint@") and raw.headers["x-pathloop-model-uri"] == ref
    from serve.api import public_ref

    assert public_ref(str(Path.cwd() / "runs/ckpt")) == "runs/ckpt"
    assert public_ref("file:///srv/x/ckpt").startswith("ckpt@")
    assert public_ref("../../srv/ckpt").startswith("ckpt@")
    assert public_ref("models:/pathloop/3") == "models:/pathloop/3"


# ----------------------------------------------------------------------------- errors, exposure


def test_other_errors_name_the_fix(client):
    one_line_4xx(client.get("/v1/nothing"), 404, "no route GET /v1/nothing", "/openapi.json")
    one_line_4xx(client.get("/v1/generate"), 405, "/openapi.json")
    bad = client.post(
        "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    one_line_4xx(bad, 422, "not valid JSON", "send one JSON object")
    one_line_4xx(client.post("/v1/generate", json=[1, 2]), 422, "JSON object")


def test_exposing_the_api_without_tokens_is_a_config_error():
    from pydantic import ValidationError

    from serve.args import ServeArgs

    with pytest.raises(ValidationError, match="open_on_network"):
        ServeArgs(host="0.0.0.0")
    assert ServeArgs(host="0.0.0.0", api_tokens=[TOKEN]).host == "0.0.0.0"
    assert ServeArgs(host="0.0.0.0", open_on_network=True).open_on_network
    assert ServeArgs(host="::1").host == "::1" and ServeArgs(host="localhost")
