"""The Serve application end to end on local Ray: every route, every error, batching, fuzzing.

One app per module (tiny 16 px UNet, 2 sampling steps, judge on) on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.timeout(240)

API_TOKEN = "test-api-token-123"
MAX_N, MAX_STEPS, MAX_SIDE, MAX_BATCH = 4, 4, 256, 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path: Path, seed: int = 0, step: int = 7) -> Path:
    """A 16 px class-conditional UNet over the 16 bone-marrow classes (untrained, seeded)."""
    import torch

    from pathloop.config import ModelConfig, NoiseConfig
    from pathloop.diffusion import build_unet, save_checkpoint
    from pathloop.vocab import BONE_MARROW_16

    torch.manual_seed(seed)
    cfg = ModelConfig(block_out_channels=(16, 32), layers_per_block=1, sample_size=16)
    unet = build_unet(cfg, num_classes=16)
    noise = {"noise": NoiseConfig().model_dump()}
    return save_checkpoint(path, unet, step=step, config=noise, vocab=BONE_MARROW_16)


def registered_checkpoint(root: Path, ckpt: Path) -> tuple[str, str]:
    """(tracking URI, models:/serve-tiny/1) of ``ckpt`` registered in a store under ``root``."""
    from pathloop import tracking
    from pathloop.config import TrackingConfig

    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id = tracking.start_run(TrackingConfig(tracking_uri=uri), root, {}, run_name="round3")
    model_uri = tracking.log_checkpoint_model(uri, run_id, ckpt, "serve-tiny")
    tracking.end_run(uri, run_id)
    return uri, model_uri


def random_shards(path: Path, n: int, size: int = 16, seed: int = 0) -> Path:
    """``n`` random RGB images cycling through the 16 classes, as a shard set."""
    from pathloop.data import ShardWriter
    from pathloop.vocab import BONE_MARROW_16

    rng = np.random.default_rng(seed)
    with ShardWriter(path, BONE_MARROW_16) as w:
        for i in range(n):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            w.add(img, i % 16, split="none", source="synthetic")
    return path


def png_of(shape: tuple[int, int]) -> bytes:
    from pathloop.data import encode_png

    return encode_png(np.full((*shape, 3), 200, dtype=np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from pathloop.feedback import FeedbackStore

    root = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(root / "ckpt")
    other = tiny_checkpoint(root / "other", seed=1, step=9)  # another round's model
    mlflow_uri, registered = registered_checkpoint(root, tiny_checkpoint(root / "reg", 2, step=11))
    samples = random_shards(root / "samples", 24)
    db = root / "feedback.db"
    store = FeedbackStore(db)
    rater_id, token = store.add_rater("alice")
    return {
        "root": root,
        "ckpt": ckpt,
        "other": other,
        "mlflow": mlflow_uri,
        "registered": registered,
        "samples": samples,
        "db": db,
        "store": store,
        "rater_id": rater_id,
        "rater_token": token,
    }


@pytest.fixture(scope="module")
def url(ray_session, world) -> str:
    from ray import serve

    from serve.app import build_app
    from serve.args import ServeArgs

    port = free_port()
    args = ServeArgs(
        model=str(world["ckpt"]),
        models={"other": str(world["other"])},
        registered_models=["serve-tiny"],
        tracking_uri=world["mlflow"],
        max_models_per_replica=2,  # three models: one load evicts another
        judge=True,
        port=port,
        torch_threads=1,
        limits={
            "max_n": MAX_N,
            "max_steps": MAX_STEPS,
            "max_image_bytes": 200_000,
            "max_side": MAX_SIDE,
            "max_score_batch": MAX_BATCH,
        },
        max_batch_size=8,
        batch_wait_timeout_s=0.2,
        request_timeout_s=60,
        api_tokens=[API_TOKEN],
        docs="open",  # the test reads /docs and /openapi.json without a token
        feedback_url=str(world["db"]),
        review_samples_dir=str(world["samples"]),
        real_examples=str(world["samples"]),
        real_examples_per_class=2,
        generator_cpus=1,
        scorer_cpus=0.5,
        ingress_cpus=0.5,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=args.app_name, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def api(url) -> httpx.Client:
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=60
    ) as c:
        yield c


@pytest.fixture(scope="module")
def rater(url, world) -> httpx.Client:
    headers = {"Authorization": f"Bearer {world['rater_token']}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        yield c


def gen(api: httpx.Client, **body) -> httpx.Response:
    return api.post("/v1/generate", json={"steps": 2, **body})


# ----------------------------------------------------------------------------- ops, docs, auth


def test_health_ready_docs_and_ui(url):
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz").json()
    assert ready == {"ready": True, "models": {"generator": True, "scorer": True}}
    spec = httpx.get(f"{url}/openapi.json").json()
    names = [op["operationId"] for p in spec["paths"].values() for op in p.values()]
    assert len(names) == len(set(names)) >= 11  # unique route names
    assert "/v1/review/image/{image_id}.png" in spec["paths"]
    assert httpx.get(f"{url}/docs").status_code == 200
    page = httpx.get(f"{url}/review")
    assert page.status_code == 200 and "pathloop review" in page.text
    assert "image-rendering: pixelated" in httpx.get(f"{url}/static/review.css").text
    assert httpx.get(f"{url}/static/review.js").status_code == 200


def test_classes_and_auth(url, api, world):
    body = api.get("/v1/classes").json()
    assert len(body["classes"]) == 16 and len(body["criteria"]) == 7
    assert body["classes"][14]["subtypes"] == ["band", "segmented"]
    no = httpx.get(f"{url}/v1/classes")
    assert no.status_code == 401 and "missing API token" in no.json()["detail"]
    bad = httpx.get(f"{url}/v1/classes", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    # The API token is not a rater token, nor the reverse.
    assert api.get("/v1/review/progress").status_code == 401
    assert httpx.get(f"{url}/v1/review/progress").status_code == 401
    rater_only = {"Authorization": f"Bearer {world['rater_token']}"}
    assert httpx.get(f"{url}/v1/classes", headers=rater_only).status_code == 401


# ----------------------------------------------------------------------------- generate


def test_generate_png_json_and_determinism(api):
    a = gen(api, class_name="M5", n=1, seed=3, format="png")
    assert a.status_code == 200 and a.headers["content-type"] == "image/png"
    assert a.headers["x-pathloop-class"] == "neutrophil" and a.headers["x-pathloop-seed"] == "3"
    b = gen(api, class_name="neutrophil", n=1, seed=3, format="png")
    assert a.content == b.content  # same seed (class by code or name) -> same PNG bytes
    assert gen(api, class_name="M5", n=1, seed=4, format="png").content != a.content
    js = gen(api, class_name="m5", n=2, seed=3, guidance=1.5).json()["images"]
    assert [im["seed"] for im in js] == [3, 4]
    assert js[0]["provenance"] == {
        "model": "default",
        "model_uri": js[0]["provenance"]["model_uri"],
        "checkpoint_step": 7,
        "sampler": "ddim",
        "steps": 2,
        "guidance": 1.5,
        "guidance_interval": [0.0, 1.0],
        "guide": None,
        "weights": "ema",
        "guide_weights": None,
        "seed": 3,
    }
    # format=png with n > 1 answers JSON (documented).
    multi = gen(api, class_name="M5", n=2, seed=3, format="png")
    assert multi.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"class_name": "M9"}, "valid classes: B1 (basophilic myelocyte)"),
        ({"class_name": "M5", "n": 0}, "n:"),
        ({"class_name": "M5", "n": MAX_N + 1}, f"1..{MAX_N}"),
        ({"class_name": "M5", "steps": 0}, "steps:"),
        ({"class_name": "M5", "steps": MAX_STEPS + 1}, f"1..{MAX_STEPS}"),
        ({"class_name": "M5", "guidance": 20.5}, "guidance:"),
        ({"class_name": "M5", "guidance": -1}, "guidance:"),
        ({"class_name": "M5", "sampler": "euler"}, "sampler:"),
        ({"class_name": "M5", "seed": -1}, "seed:"),
        ({"class_name": "M5", "colour": "red"}, "colour:"),
        ({"n": 1}, "class_name:"),
    ],
)
def test_generate_errors_are_422(api, body, needle):
    r = gen(api, **body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


def test_malformed_json_is_422(api):
    r = api.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_concurrent_requests_are_batched_and_unchanged(api):
    from ray import serve

    from pathloop.data import decode_png

    reqs = [dict(class_name="B1", n=2, seed=11), dict(class_name="MO2", n=1, seed=40)]
    handle = serve.get_deployment_handle("Generator", app_name="pathloop")
    before = len(handle.stats.remote().result())
    out: list = [None, None]
    gate = threading.Barrier(2)

    def call(i: int) -> None:
        gate.wait()
        out[i] = gen(api, **reqs[i]).json()["images"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    calls = handle.stats.remote().result()[before:]
    assert any(c["requests"] == 2 and c["images"] == 3 for c in calls), calls
    for req, together in zip(reqs, out, strict=True):
        alone = gen(api, **req).json()["images"]
        for x, y in zip(together, alone, strict=True):
            a = decode_png(base64.b64decode(x["image_b64"])).astype(int)
            b = decode_png(base64.b64decode(y["image_b64"])).astype(int)
            # Same per-image seeds; batched convolutions may round differently by 1 level.
            assert np.abs(a - b).max() <= 1 and x["seed"] == y["seed"]


# ----------------------------------------------------------------------------- several models


def test_one_deployment_serves_several_models(api, world):
    """/v1/generate for three models (default, a named one, a registered version) from one
    Generator deployment that keeps two loaded: provenance names each, images differ."""
    from ray import serve

    listed = api.get("/v1/models").json()
    ids = [m["id"] for m in listed["models"]]
    assert ids == ["default", "other", "models:/serve-tiny/1"] and world["registered"] == ids[2]
    assert listed["models"][0]["default"] and listed["max_loaded_per_replica"] == 2
    assert not listed["models"][1]["reference"].startswith("/")  # no server paths
    handle = serve.get_deployment_handle("Generator", app_name="pathloop")
    before = len(handle.stats.remote().result())
    body = {"class_name": "M5", "n": 1, "seed": 5}
    out = {}
    for model in (None, "other", world["registered"], None):
        r = gen(api, **body, **({"model": model} if model else {}))
        assert r.status_code == 200, r.text
        (im,) = r.json()["images"]
        out.setdefault(model, []).append(im)
    steps = {m: ims[0]["provenance"]["checkpoint_step"] for m, ims in out.items()}
    assert steps == {None: 7, "other": 9, world["registered"]: 11}
    assert [ims[0]["provenance"]["model"] for ims in out.values()] == [
        "default",
        "other",
        world["registered"],
    ]
    assert out[world["registered"]][0]["provenance"]["model_uri"] == world["registered"]
    pngs = {m: ims[0]["image_b64"] for m, ims in out.items()}
    assert len(set(pngs.values())) == 3  # same seed, three different models
    assert out[None][1]["image_b64"] == out[None][0]["image_b64"]  # reloaded after eviction
    calls = handle.stats.remote().result()[before:]
    assert {c["model"] for c in calls} == {"default", "other", world["registered"]}
    apps = serve.status().applications["pathloop"].deployments
    assert sorted(apps) == ["Generator", "Ingress", "Scorer"]  # one Generator for all models


def test_unknown_or_missing_models_are_refused(api):
    for model, status, needle in [
        ("nope", 422, "valid models: default, other, models:/serve-tiny/<version>"),
        ("/etc/passwd", 422, "is not served"),
        ("runs:/abc/model", 422, "is not served"),
        ("models:/serve-tiny/99", 404, "GET /v1/models"),
    ]:
        r = gen(api, class_name="M5", model=model)
        assert r.status_code == status and needle in r.json()["detail"], (model, r.text)


# ----------------------------------------------------------------------------- score


def test_score_json_upload_and_multipart(api):
    png = gen(api, class_name="M5", n=1, seed=1, format="png").content
    b64 = base64.b64encode(png).decode()
    r = api.post("/v1/score", json={"image_b64": b64, "class_name": "M5"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reward"] is None and isinstance(body["plausible"], bool)
    assert len(body["criteria"]) == 7 and body["class_name"] == "neutrophil"
    raw = api.post(
        "/v1/score/upload",
        params={"class_name": "M5"},
        content=png,
        headers={"content-type": "image/png"},
    )
    assert raw.status_code == 200 and raw.json() == body
    form = api.post(
        "/v1/score/upload", files={"file": ("x.png", png, "image/png")}, data={"class_name": "M5"}
    )
    assert form.status_code == 200 and form.json() == body
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (180, 120, 200)).save(buf, format="JPEG")  # the model's size
    jpg = api.post(
        "/v1/score/upload",
        params={"class_name": "E4"},
        content=buf.getvalue(),
        headers={"content-type": "image/jpeg"},
    )
    assert jpg.status_code == 200 and jpg.json()["plausible"] is False


def test_score_batch_json_and_multipart_match_single_scores(api):
    from PIL import Image

    pngs = [gen(api, class_name="M5", n=1, seed=k, format="png").content for k in range(3)]
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (180, 120, 200)).save(buf, format="JPEG")
    pngs.append(buf.getvalue())
    names = ["M5", "neutrophil", "B1", "E4"]
    items = [
        {"image_b64": base64.b64encode(p).decode(), "class_name": c}
        for p, c in zip(pngs, names, strict=True)
    ]
    one = [api.post("/v1/score", json=it).json() for it in items]
    batch = api.post("/v1/score/batch", json=items)
    assert batch.status_code == 200, batch.text
    assert batch.json()["results"] == one and one[3]["plausible"] is False
    files = [("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    form = api.post("/v1/score/batch/upload", files=files, data={"class_name": names})
    assert form.status_code == 200 and form.json()["results"] == one, form.text
    same = api.post("/v1/score/batch/upload", params={"class_name": "M5"}, files=files[:2])
    assert same.json()["results"] == one[:2]


def test_score_batch_errors(api):
    ok = {"image_b64": base64.b64encode(png_of((16, 16))).decode(), "class_name": "M5"}
    cases = [
        ([ok] * (MAX_BATCH + 1), 422, f"send 1 to {MAX_BATCH} per request"),
        ([], 422, "send 1 to"),
        ([ok, {**ok, "class_name": "nope"}], 422, "image 1: "),
        ([ok, ok, {**ok, "image_b64": "###"}], 422, "image 2: image_b64 is not valid base64"),
        ([{**ok, "image_b64": base64.b64encode(png_of((8, 8))).decode()}], 422, "image 0: "),
        ({"image_b64": ok["image_b64"]}, 422, "JSON array"),
    ]
    for body, status, needle in cases:
        r = api.post("/v1/score/batch", json=body)
        assert r.status_code == status and needle in r.json()["detail"], r.text
    png = png_of((16, 16))
    files = [("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))]
    names = api.post("/v1/score/batch/upload", files=files, data={"class_name": ["M5"] * 3})
    assert names.status_code == 422 and "2 'file' parts and 3 class names" in names.text
    gif = api.post("/v1/score/batch/upload", files=[("file", ("a.gif", b"GIF89a", "image/gif"))])
    assert gif.status_code == 415
    raw = api.post("/v1/score/batch/upload", content=png, headers={"content-type": "image/png"})
    assert raw.status_code == 415


def test_score_errors(api):
    ok = base64.b64encode(png_of((16, 16))).decode()
    cases = [
        ({"image_b64": ok, "class_name": "nope"}, 422, "valid classes"),
        ({"image_b64": "###", "class_name": "M5"}, 422, "base64"),
        (
            {"image_b64": base64.b64encode(b"GIF89a not really").decode(), "class_name": "M5"},
            422,
            "cannot decode",
        ),
        (
            {"image_b64": base64.b64encode(png_of((MAX_SIDE + 1, 8))).decode(), "class_name": "M5"},
            413,
            "px a side",
        ),
        ({"image_b64": "A" * 400_000, "class_name": "M5"}, 413, "limit"),
    ]
    for body, status, needle in cases:
        r = api.post("/v1/score", json=body)
        assert r.status_code == status and needle in r.json()["detail"], (
            body["class_name"],
            r.text,
        )
    big = api.post(
        "/v1/score/upload",
        params={"class_name": "M5"},
        content=b"\0" * 300_000,
        headers={"content-type": "image/png"},
    )
    assert big.status_code == 413
    junk = api.post(
        "/v1/score/upload",
        params={"class_name": "M5"},
        content=b"junk",
        headers={"content-type": "image/png"},
    )
    assert junk.status_code == 422
    noname = api.post(
        "/v1/score/upload", content=png_of((8, 8)), headers={"content-type": "image/png"}
    )
    assert noname.status_code == 422 and "class_name" in noname.json()["detail"]


# ----------------------------------------------------------------------------- review


def test_review_routes(rater, world):
    meta = rater.get("/v1/review/meta").json()
    assert meta["rater"] == "alice" and [c["hotkey"] for c in meta["criteria"]] == list("1234567")
    m5 = next(c for c in meta["classes"] if c["code"] == "M5")
    assert m5["subtypes"] == [{"key": "B", "subtype": "band"}, {"key": "S", "subtype": "segmented"}]
    nxt = rater.get("/v1/review/next").json()
    assert nxt["position"] == 0 and nxt["done"] == 0 and nxt["total"] == 24
    assert nxt["prev_id"] is None and len(nxt["real_examples"]) == 2
    first = nxt["image_id"]
    lab = rater.post(
        "/v1/review/labels",
        json={"image_id": first, "plausible": False, "failed_criteria": ["granules", "nc_ratio"]},
    )
    assert lab.status_code == 200, lab.text
    assert lab.json()["label"]["failed_criteria"] == ["nc_ratio", "granules"]
    assert lab.json()["next_id"] == nxt["next_id"] and lab.json()["done"] == 1
    again = rater.get("/v1/review/next", params={"image_id": first}).json()
    assert again["label"]["plausible"] is False and again["next_id"] == nxt["next_id"]
    png = rater.get(f"/v1/review/image/{first}.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert base64.b64encode(png.content).decode() == nxt["image_b64"]
    prog = rater.get("/v1/review/progress").json()
    assert prog == {
        "round_id": prog["round_id"],
        "rater": "alice",
        "done": 1,
        "total": 24,
        "next_id": nxt["next_id"],
    }
    undo = rater.post("/v1/review/undo", json={"image_id": first}).json()
    assert undo["label"] is None and undo["done"] == 0
    assert world["store"].labels(prog["round_id"], world["rater_id"]) == []


def test_review_errors(rater, world):
    images = world["store"].images(1)
    m5 = next(im.image_id for im in images if im.class_name == "neutrophil")
    b1 = next(im.image_id for im in images if im.class_name == "basophilic myelocyte")
    cases = [
        ({"image_id": "not-an-image", "plausible": True}, "not in round"),
        ({"image_id": b1, "plausible": False, "failed_criteria": ["bogus"]}, "unknown criteria"),
        ({"image_id": m5, "plausible": True, "subtype": "curly"}, "valid subtypes: band"),
        ({"image_id": b1, "plausible": True, "subtype": "band"}, "has no subtypes"),
        ({"image_id": b1, "plausible": "maybe"}, "plausible:"),
    ]
    for body, needle in cases:
        r = rater.post("/v1/review/labels", json=body)
        assert r.status_code == 422 and needle in r.json()["detail"], r.text
    assert rater.get("/v1/review/next", params={"image_id": "zzz"}).status_code == 422
    assert rater.post("/v1/review/undo", json={"image_id": b1}).status_code == 422
    assert rater.get("/v1/review/image/zzz.png").status_code == 404
    ok = rater.post(
        "/v1/review/labels", json={"image_id": m5, "plausible": True, "subtype": "band"}
    )
    assert ok.status_code == 200 and ok.json()["label"]["subtype"] == "band"
    rater.post("/v1/review/undo", json={"image_id": m5})


# ----------------------------------------------------------------------------- fuzzing


def test_openapi_fuzzing_finds_no_server_errors(url, world):
    """Schemathesis from the served OpenAPI schema: positive and negative cases, no 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    api_h = {"Authorization": f"Bearer {API_TOKEN}"}
    rater_h = {"Authorization": f"Bearer {world['rater_token']}"}
    stop_at = time.monotonic() + 50  # the whole fuzz run stays under a minute
    errors: list[str] = []
    calls = [0]

    def fuzz_operation(op, mode, headers: dict) -> None:
        @settings(
            max_examples=10,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            if time.monotonic() > stop_at:
                return
            resp = case.call(base_url=url, headers=headers, timeout=30)
            calls[0] += 1
            if resp.status_code >= 500:
                errors.append(
                    f"{op.method.upper()} {op.path}: {resp.status_code} {resp.text[:200]}"
                )

        try:
            fuzz()
        except Unsatisfiable:  # no negative case exists (e.g. an operation without inputs)
            pass

    for result in schema.get_all_operations():
        op = result.ok()
        headers = rater_h if op.path.startswith("/v1/review") else api_h
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz_operation(op, mode, headers)
    assert calls[0] >= 100, calls
    assert not errors, errors[:5]


# ----------------------------------------------------------------------------- timeouts


def test_timeout_is_504_without_serve():
    """A backend that never answers within request_timeout_s gives 504 (ServeBackend's path)."""
    import asyncio

    from fastapi.testclient import TestClient

    from pathloop.vocab import BONE_MARROW_16
    from serve.api import build_api
    from serve.app import ServeBackend
    from serve.args import ServeArgs

    class Stuck:
        cancelled = False

        def __await__(self):
            return asyncio.sleep(3600).__await__()

        def cancel(self) -> None:
            Stuck.cancelled = True

    class Method:
        def remote(self, *a):
            return Stuck()

    class Handle:
        generate = Method()

        def options(self, **kw):  # multiplexed_model_id
            return self

    backend = ServeBackend(Handle(), None, timeout_s=0.2)
    info = {
        "vocab": BONE_MARROW_16.model_dump(mode="json"),
        "model_uri": "m",
        "checkpoint_step": 0,
        "sample_size": 16,
    }
    app = build_api(ServeArgs(model="m", request_timeout_s=0.2), backend, info)
    r = TestClient(app).post("/v1/generate", json={"class_name": "M5"})
    assert r.status_code == 504 and "did not answer within 0.2 s" in r.json()["detail"]
    assert Stuck.cancelled


def test_in_process_backend_keeps_a_small_cache_of_models(world):
    """--no-ray: the same routes over LocalBackend, its models in an LRU of
    max_models_per_replica; batch scoring in one scorer call."""
    from fastapi.testclient import TestClient

    from serve.api import LocalBackend, build_api
    from serve.args import ServeArgs

    args = ServeArgs(
        model=str(world["ckpt"]),
        models={"other": str(world["other"])},
        max_models_per_replica=1,
        judge=True,
        torch_threads=1,
    )
    backend = LocalBackend(args)
    client = TestClient(build_api(args, backend, backend.default_info))
    body = {"class_name": "M5", "steps": 2, "seed": 5}
    steps = []
    for model in (None, "other", None):
        r = client.post("/v1/generate", json={**body, **({"model": model} if model else {})})
        assert r.status_code == 200, r.text
        steps.append(r.json()["images"][0]["provenance"]["checkpoint_step"])
        assert list(backend.models.models) == [model or "default"]  # one kept: the last used
    assert steps == [7, 9, 7]
    assert [c["model"] for c in backend.calls] == ["default", "other", "default"]
    assert [m["id"] for m in client.get("/v1/models").json()["models"]] == ["default", "other"]
    png = base64.b64encode(png_of((16, 16))).decode()
    items = [{"image_b64": png, "class_name": c} for c in ("M5", "E4", "B1")]
    calls = []
    run = backend.scorer.run
    backend.scorer.run = lambda batch: calls.append(len(batch)) or run(batch)
    r = client.post("/v1/score/batch", json=items)
    assert r.status_code == 200 and len(r.json()["results"]) == 3 and calls == [3]


def test_in_process_generate_takes_interval_guide_and_weights(world):
    """--no-ray: a guide equal to the model, or an interval that holds no step, draws the
    conditional images; another served model as guide draws others; each says so."""
    from fastapi.testclient import TestClient

    from serve.api import LocalBackend, build_api
    from serve.args import ServeArgs

    args = ServeArgs(model=str(world["ckpt"]), models={"other": str(world["other"])}, judge=False)
    backend = LocalBackend(args)
    client = TestClient(build_api(args, backend, backend.default_info))
    body = {"class_name": "M5", "steps": 2, "seed": 5, "format": "png"}

    def png(**kw) -> bytes:
        r = client.post("/v1/generate", json={**body, **kw})
        assert r.status_code == 200, r.text
        return r.content

    cond = png(guidance=1.0)
    assert png(guidance=3.0, guide="default") == cond
    assert png(guidance=3.0, guidance_interval=[0.6, 0.9]) == cond  # t/T = 0.999, 0.499
    assert png(guidance=3.0) != cond and png(guidance=3.0, guide="other") != png(guidance=3.0)
    assert png(guidance=1.0, weights="raw") == cond  # this checkpoint has no EMA weights
    r = client.post("/v1/generate", json={**body, "format": "base64", "guide": "other"})
    prov = r.json()["images"][0]["provenance"]
    assert (prov["guide"], prov["guide_weights"], prov["weights"]) == ("other", "ema", "ema")
    for bad, needle in (
        ({"guide": "nope"}, "not served"),
        ({"guidance_interval": [0.9, 0.1]}, "guidance_interval"),
        ({"weights": "best"}, "weights"),
    ):
        r = client.post("/v1/generate", json={**body, **bad})
        assert r.status_code == 422 and needle in r.json()["detail"], r.text


# ----------------------------------------------------------------------------- merging


def _merging_run(fn, batches: list[list[dict]], max_size: int) -> list:
    """Submit batch 0, then the others while fn still runs batch 0; gather every result."""
    import asyncio

    from serve.app import MergingRunner, _images_in

    started, release = threading.Event(), threading.Event()

    def slow_first(jobs: list[dict]) -> list:
        if not started.is_set():
            started.set()
            release.wait(30)
        return fn(jobs)

    async def main() -> list:
        runner = MergingRunner(slow_first, max_size, "test", _images_in)
        first = asyncio.ensure_future(runner.run(batches[0]))
        await asyncio.to_thread(started.wait, 30)  # the thread is busy with batch 0
        rest = [asyncio.ensure_future(runner.run(b)) for b in batches[1:]]
        await asyncio.sleep(0)  # every other batch is waiting now
        release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    return asyncio.run(main())


def test_merging_runner_joins_batches_that_wait_together():
    calls: list[list[int]] = []

    def fn(jobs: list[dict]) -> list[str]:
        calls.append([j["id"] for j in jobs])
        return [f"out{j['id']}" for j in jobs]

    batches = [[{"id": 0, "n": 3}], [{"id": 1, "n": 1}, {"id": 2, "n": 2}], [{"id": 3, "n": 1}]]
    batches.append([{"id": 4, "n": 3}])  # does not fit with 1-3 in 4 images: a call of its own
    out = _merging_run(fn, batches, max_size=4)
    assert calls == [[0], [1, 2, 3], [4]]
    assert out == [["out0"], ["out1", "out2"], ["out3"], ["out4"]]


def test_merging_runner_gives_each_batch_its_error():
    def fn(jobs: list[dict]) -> list:
        if any(j["id"] == 2 for j in jobs):
            raise ValueError("bad job 2")
        return [j["id"] for j in jobs]

    batches = [[{"id": 0, "n": 1}], [{"id": 1, "n": 1}], [{"id": 2, "n": 1}]]
    out = _merging_run(fn, batches, max_size=4)
    assert out[0] == [0]
    assert [str(e) for e in out[1:]] == ["bad job 2", "bad job 2"]  # 1 and 2 ran together


@pytest.mark.parametrize("on", [False, True])
def test_model_replicas_access_log_follows_args(tmp_path, on):
    """The ingress logs every request; the Generator and Scorer only when model_access_log."""
    from serve.app import build_app
    from serve.args import ServeArgs

    app = build_app(ServeArgs(model=str(tmp_path), judge=True, model_access_log=on))
    ingress = app._bound_deployment
    assert (ingress.logging_config or {}).get("enable_access_log", True)
    models = [a._bound_deployment for a in ingress.init_args[1:]]
    assert [m.name for m in models] == ["Generator", "Scorer"]
    assert [m.logging_config["enable_access_log"] for m in models] == [on, on]


_FAULTS = """
import resource, sys, torch
from pathloop.config import ModelConfig, NoiseConfig
from pathloop.diffusion import build_unet, sample
from serve.models import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
unet = build_unet(ModelConfig(), num_classes=16)
kw = dict(steps=2, guidance=2.0, batch_size=4)
sample(unet, NoiseConfig(), [0, 1, 2, 3], **kw)  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for seed in range(12):  # a one-time ~1,500-fault growth of the heap, averaged over 12 calls
    sample(unet, NoiseConfig(), [0, 1, 2, 3], seed=seed, **kw)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 12)
"""


def test_keep_freed_memory_stops_page_faults_between_sampling_calls():
    """After keep_freed_memory, a fresh process's sample() calls reuse memory (glibc only)."""
    import subprocess
    import sys

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    kept = faults("on")  # without keep_freed_memory: 6,000-9,400 per call on a 2-core machine
    assert kept < 500, f"{kept} page faults per sample() call with freed memory kept"


def test_merging_runner_skips_batches_cancelled_while_waiting():
    import asyncio

    from serve.app import MergingRunner

    calls: list[list[int]] = []
    started, release = threading.Event(), threading.Event()

    def fn(jobs: list[dict]) -> list[int]:
        calls.append([j["id"] for j in jobs])
        if len(calls) == 1:
            started.set()
            release.wait(30)
        return [j["id"] for j in jobs]

    async def main() -> list:
        runner = MergingRunner(fn, 4, "test")
        first = asyncio.ensure_future(runner.run([{"id": 0}]))
        await asyncio.to_thread(started.wait, 30)
        gone, kept = (asyncio.ensure_future(runner.run([{"id": i}])) for i in (1, 2))
        await asyncio.sleep(0)
        gone.cancel()  # e.g. its request timed out
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(first, kept)

    assert asyncio.run(main()) == [[0], [2]]
    assert calls == [[0], [2]]
