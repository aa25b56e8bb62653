"""Evaluators: the registry, the checklist, the MLLM against a local fake API, the judge, rounds."""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from pathloop.data import ShardWriter, decode_png
from pathloop.experts import (
    BASE_URL_ENV,
    EVALUATORS,
    MalformedReply,
    MLLMConfig,
    MLLMError,
    evaluate_round,
    get_evaluator,
    load_checklist,
    parse_answers,
)
from pathloop.feedback import FeedbackStore
from pathloop.vocab import BONE_MARROW_16, CRITERIA, ClassInfo, Vocabulary

KEY_ENV = "PATHLOOP_TEST_MLLM_KEY"
KEY = "sk-test-6f1d9c2a-never-log-me"
ITEMS = [
    {"criterion": "cell_size", "question": "Is the cell about twice a red cell?"},
    {"criterion": "inclusions", "question": "Are nucleoli visible?", "plausible": False},
    {"criterion": "granules", "question": "Are the granules fine and pink?"},
]
# The fake API behaves by class name (found in the prompt): see FakeAPI.reply.
NAMES = ("good", "perfect", "flaky", "broken", "slow", "paced", "unlisted", "throttled")
VOCAB = Vocabulary(
    classes=tuple(
        ClassInfo(id=i, name=n, code=n.upper(), description=f"A {n} cell.")
        for i, n in enumerate(NAMES)
    )
)
ANSWERS = {"good": [1, 1, 1], "perfect": [1, 0, 1]}  # good: nucleoli seen -> inclusions fail


class FakeAPI:
    """State of the fake OpenAI-compatible server: what it saw, and how many were in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.in_flight = self.max_in_flight = 0
        self.calls: Counter = Counter()
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.model_answers: dict[str, list[int]] = {}

    def reply(self, body: dict) -> str:
        text = body["messages"][1]["content"][0]["text"]
        name = re.search(r"should show one (\w+) ", text).group(1)
        n = len(re.findall(r"^\d+\. ", text, flags=re.M))
        with self.lock:
            self.calls[name] += 1
            count = self.calls[name]
        good = self.model_answers.get(body["model"]) or ANSWERS.get(name) or [1, 0, 1][:n]
        if name == "flaky" and count == 1:
            return "Sure! The cell looks fine to me."
        if name == "broken":
            return "I cannot tell." if count % 2 else "```json\n[1, 0]\n```"
        if name == "slow":
            time.sleep(1.0)  # longer than the client timeout; ends by itself
        if name == "paced":
            time.sleep(0.15)
        return f"```json\n{json.dumps(good)}\n```"


def _handler(api: FakeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            api.auth.append(self.headers.get("Authorization"))
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self._send(401, {"error": {"message": "bad key", "type": "auth"}})
            if "one throttled " in body["messages"][1]["content"][0]["text"]:
                with api.lock:
                    api.calls["429"] += 1
                    first = api.calls["429"] == 1
                if first:  # a 429: the OpenAI client retries it itself, after its back-off
                    return self._send(429, {"error": {"message": "slow down", "type": "rate"}})
            with api.lock:
                api.bodies.append(body)
                api.in_flight += 1
                api.max_in_flight = max(api.max_in_flight, api.in_flight)
            try:
                text = api.reply(body)
            finally:
                with api.lock:
                    api.in_flight -= 1
            self._send(
                200,
                {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": text},
                        }
                    ],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107},
                },
            )

    return Handler


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeAPI, str]]:
    api = FakeAPI()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield api, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def api(server: tuple[FakeAPI, str], monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
    server[0].reset()
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv(BASE_URL_ENV, server[1])  # read when the evaluator runs
    return server[0]


@pytest.fixture(scope="module")
def checklist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("checklist") / "test.yaml"
    classes = {c.code: ITEMS for c in VOCAB.classes if c.name != "unlisted"}
    path.write_text(yaml.safe_dump({"version": 1, "classes": classes}))
    return path


def _mllm(checklist: Path, **kw: object) -> object:
    opts = {
        "model": "fake-vl",
        "api_key_env": KEY_ENV,
        "checklist": str(checklist),
        "timeout_s": 5.0,
        **kw,
    }
    return get_evaluator("mllm", **opts)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def _ids(*names: str) -> list[int]:
    return [VOCAB.lookup(n).id for n in names]


# ----------------------------------------------------------------------------- registry, checklist


def test_unknown_evaluator_lists_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="valid evaluators: judge, mllm, human"):
        get_evaluator("gpt")
    assert set(EVALUATORS) == {"judge", "mllm", "human"}


def test_packaged_checklist_covers_every_class_and_criterion() -> None:
    checklist = load_checklist()
    assert set(checklist) == {c.code for c in BONE_MARROW_16.classes}
    for code, items in checklist.items():
        assert sorted(i.criterion for i in items) == sorted(CRITERIA), code
    assert any("2-5 segmented lobes" in i.question for i in checklist["M5"])


def test_bad_checklist_names_the_valid_criteria(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"classes": {"M5": [{"criterion": "shape", "question": "?"}]}}))
    with pytest.raises(ValueError, match=r"classes\.M5\.0\.criterion.*valid criteria: cell_size"):
        load_checklist(bad)


def test_parse_answers() -> None:
    assert parse_answers("```json\n[1, 0, 1]\n```", 3) == [1, 0, 1]
    assert parse_answers("Answers: [0,1] as asked.", 2) == [0, 1]
    for text, message in [
        ("yes", "no JSON list"),
        ("[1, 0]", "expected 3"),
        ("[1, 2, 0]", "0 or 1"),
        ("", "empty"),
        ("[1, 0,]", "not valid"),
    ]:
        with pytest.raises(MalformedReply, match=message):
            parse_answers(text, 3)


# ----------------------------------------------------------------------------- MLLM


def test_good_replies_are_scored(api: FakeAPI, checklist: Path) -> None:
    ev = _mllm(checklist)
    verdicts = ev(_images(2), _ids("good", "perfect"), VOCAB)
    good, perfect = verdicts
    assert good.plausible is False and good.failed_criteria == ("inclusions",)
    assert good.scores == {"cell_size": 1.0, "inclusions": 0.0, "granules": 1.0}
    assert perfect.plausible is True and perfect.failed_criteria == () and perfect.reason == ""
    assert good.usage == {"requests": 1, "prompt_tokens": 100, "completion_tokens": 7}
    assert ev.last_usage == {"requests": 2, "prompt_tokens": 200, "completion_tokens": 14}
    assert ev.rater_name == "mllm:fake-vl" and ev.kind == "mllm"
    assert set(api.auth) == {f"Bearer {KEY}"}  # the key from the env var named in the config

    body = next(b for b in api.bodies if "one good " in b["messages"][1]["content"][0]["text"])
    assert body["model"] == "fake-vl" and body["messages"][0]["role"] == "system"
    part, image = body["messages"][1]["content"]
    text = part["text"]
    assert "good (class GOOD)" in text and "A good cell." in text
    for k, item in enumerate(ITEMS, 1):
        assert f"{k}. {item['question']}" in text
    assert "ONLY a JSON list of 3" in text
    url = image["image_url"]["url"]
    assert image["type"] == "image_url" and url.startswith("data:image/png;base64,")
    png = decode_png(base64.b64decode(url.split(",", 1)[1]))
    assert png.shape == (256, 256, 3)  # 8 px upscaled x32, nearest
    assert np.array_equal(png[::32, ::32], _images(1)[0])


def test_malformed_once_then_good_is_retried(api: FakeAPI, checklist: Path) -> None:
    (v,) = _mllm(checklist)(_images(1), _ids("flaky"), VOCAB)
    assert api.calls["flaky"] == 2
    assert v.plausible is True and v.usage["requests"] == 2


def test_always_malformed_is_unscored(api: FakeAPI, checklist: Path) -> None:
    (v,) = _mllm(checklist, max_retries=2)(_images(1), _ids("broken"), VOCAB)
    assert api.calls["broken"] == 3
    assert v.plausible is None and v.failed_criteria == ()
    assert "no usable reply after 3 tries" in v.reason and "malformed reply" in v.reason


def test_rate_limited_reply_is_retried_by_the_client(api: FakeAPI, checklist: Path) -> None:
    ev = _mllm(checklist, max_retries=1)
    assert ev._client()[0].max_retries == 1  # the OpenAI client retries, not a loop of ours
    (v,) = ev(_images(1), _ids("throttled"), VOCAB)
    assert (api.calls["429"], api.calls["throttled"]) == (2, 1)
    assert v.plausible is True and v.usage["requests"] == 1
    api.reset()
    (v,) = _mllm(checklist, max_retries=0)(_images(1), _ids("throttled"), VOCAB)
    assert (api.calls["429"], api.calls["throttled"]) == (1, 0)
    assert v.plausible is None and "RateLimitError" in v.reason


def test_slow_replies_time_out_and_are_unscored(api: FakeAPI, checklist: Path) -> None:
    start = time.monotonic()
    (v,) = _mllm(checklist, timeout_s=0.3, max_retries=1)(_images(1), _ids("slow"), VOCAB)
    # two 0.3 s tries and the client's back-off between them (< 0.5 s), not two 1 s replies
    assert time.monotonic() - start < 2.0
    assert api.calls["slow"] == 2
    assert v.plausible is None and "Timeout" in v.reason


def test_concurrency_is_bounded(api: FakeAPI, checklist: Path) -> None:
    verdicts = _mllm(checklist, concurrency=3)(_images(8), _ids(*["paced"] * 8), VOCAB)
    assert all(v.plausible for v in verdicts)
    assert 2 <= api.max_in_flight <= 3


def test_models_and_repeats_are_averaged(api: FakeAPI, checklist: Path) -> None:
    api.model_answers = {"a": [1, 0, 1], "b": [1, 1, 1]}  # b sees nucleoli, a does not
    ev = _mllm(checklist, models=["a", "b"], repeats=2)
    (v,) = ev(_images(1), _ids("good"), VOCAB)
    assert Counter(b["model"] for b in api.bodies) == {"a": 2, "b": 2}
    assert v.scores["inclusions"] == 0.5 and v.failed_criteria == ("inclusions",)  # tie fails
    assert ev.rater_name == "mllm:a+b" and ev.last_usage["requests"] == 4
    lenient = _mllm(checklist, models=["a", "b"], threshold=0.6)
    assert lenient(_images(1), _ids("good"), VOCAB)[0].plausible is True  # 2 of 3 items pass


def test_class_without_checklist_is_unscored(api: FakeAPI, checklist: Path) -> None:
    (v,) = _mllm(checklist)(_images(1), _ids("unlisted"), VOCAB)
    assert v.plausible is None and "no checklist for class 'UNLISTED'" in v.reason
    assert sum(api.calls.values()) == 0


def test_api_key_never_leaks(
    api: FakeAPI, checklist: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ev = _mllm(checklist, max_retries=1)
    ev(_images(2), _ids("good", "broken"), VOCAB)
    assert KEY not in repr(ev.config) and KEY not in ev.config.model_dump_json()
    wrong = KEY[::-1]
    monkeypatch.setenv(KEY_ENV, wrong)
    with pytest.raises(MLLMError, match="AuthenticationError") as err:
        ev(_images(1), _ids("good"), VOCAB)
    assert wrong not in str(err.value) and KEY not in str(err.value)
    assert KEY not in caplog.text and wrong not in caplog.text


def test_config_rejects_unknown_options(checklist: Path) -> None:
    with pytest.raises(ValueError, match="temprature"):
        _mllm(checklist, temprature=0.5)
    assert MLLMConfig().api_key_env == "OPENAI_API_KEY" and MLLMConfig().base_url is None


# ----------------------------------------------------------------------------- judge and rounds


def test_judge_evaluator_on_phantoms() -> None:
    from pathloop.judge import judge_batch
    from pathloop.phantoms import generate

    sample = list(generate(per_class=1, size=32, seed=3, classes=[9, 14, 15]))
    images, class_ids = [s[0] for s in sample], [s[1] for s in sample]
    verdicts = get_evaluator("judge")(images, class_ids, BONE_MARROW_16)
    direct = judge_batch(images, class_ids)
    assert len(verdicts) == 3
    for v, d in zip(verdicts, direct, strict=True):
        assert v.plausible == d.plausible and list(v.failed_criteria) == d.failed
        assert set(v.scores) == set(CRITERIA) and set(v.scores.values()) <= {0.0, 1.0}
        assert v.plausible == (not v.failed_criteria)
    assert verdicts[0].subtype is None  # erythrocytes have no subtype
    other = Vocabulary(classes=(ClassInfo(id=0, name="x", code="X"),))
    assert get_evaluator("judge")(images[:1], [0], other)[0].plausible is None


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    with FeedbackStore(tmp_path / "fb.db") as s:
        yield s


def test_evaluate_round_with_the_judge(store: FeedbackStore, tmp_path: Path) -> None:
    from pathloop.phantoms import generate

    with ShardWriter(tmp_path / "samples", BONE_MARROW_16) as writer:
        for image, cid, subtype in generate(per_class=1, size=32, seed=5, classes=[0, 14]):
            writer.add(image, cid, "none", "phantom", subtype=subtype)
    rid = store.create_round(tmp_path / "samples")
    result = evaluate_round(store, rid, "judge", batch_size=1)
    assert result["n_scored"] == 2 and result["n_unscored"] == 0 and result["rater"] == "judge"
    labels = store.labels(rid)
    assert len(labels) == 2 and {lab.source for lab in labels} == {"judge"}
    assert [r.kind for r in store.raters()] == ["judge"]
    assert evaluate_round(store, rid, "judge")["n_skipped"] == 2  # resumes: nothing new


def test_evaluate_round_with_the_mllm_and_human(
    api: FakeAPI, checklist: Path, store: FeedbackStore, tmp_path: Path
) -> None:
    with ShardWriter(tmp_path / "samples", VOCAB) as writer:
        for image, name in zip(_images(3, seed=1), ("good", "perfect", "broken"), strict=True):
            writer.add(image, VOCAB.lookup(name).id, "none", "synthetic")
    rid = store.create_round(tmp_path / "samples")
    assert evaluate_round(store, rid, "human") == {
        "round_id": rid,
        "evaluator": "human",
        "status": "waiting_for_labels",
        "n_images": 3,
        "n_labelled": 0,
    }
    result = evaluate_round(
        store,
        rid,
        "mllm",
        model="fake-vl",
        api_key_env=KEY_ENV,
        checklist=str(checklist),
        max_retries=1,
    )
    assert (result["n_scored"], result["n_unscored"], result["n_plausible"]) == (2, 1, 1)
    assert result["usage"]["requests"] == 4 and result["rater"] == "mllm:fake-vl"
    by_class = {VOCAB.lookup(im.class_id).name: im.image_id for im in store.images(rid)}
    labels = {lab.image_id: lab for lab in store.labels(rid)}
    assert labels[by_class["good"]].failed_criteria == ("inclusions",)
    broken = labels[by_class["broken"]]
    assert broken.plausible is None and "malformed" in broken.comment and broken.source == "mllm"
