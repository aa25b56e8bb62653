"""Review under load through Ray Serve: 8 raters x 500 labels, and a crash of the ingress mid-run.

Every rater posts a label for each of 500 images over HTTP on loopback. When a third of the labels
are in, the ingress replica is killed (``ray.kill``: the process dies like kill -9, mid-request);
Serve starts a new one and the clients retry what was not acknowledged. Afterwards every label is
stored exactly once with the right values, every acknowledged label survived, and no request that
did not overlap the crash got a 5xx.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from pathloop.vocab import CRITERIA

pytestmark = pytest.mark.timeout(300)

N_RATERS, N_IMAGES = 8, 500
KILL_AFTER = N_RATERS * N_IMAGES // 3  # acknowledged labels before the crash
DEADLINE_S = 150  # the whole run; fails rather than hangs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def label_for(rater: int, i: int) -> dict:
    """The label rater ``rater`` gives image ``i``: a fixed mix of verdicts and criteria."""
    plausible = (i + rater) % 3 != 0
    failed = [] if plausible else [CRITERIA[(i * 7 + rater) % 7], CRITERIA[(i + 2 * rater) % 7]]
    return {"plausible": plausible, "failed_criteria": failed}


@dataclass
class Log:
    acked: dict = field(default_factory=dict)  # (rater, image_id) -> label body
    calls: list = field(default_factory=list)  # (start, end, status or -1 for transport error)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, start: float, status: int) -> None:
        with self.lock:
            self.calls.append((start, time.monotonic(), status))


def rater_loop(url: str, token: str, r: int, ids: list[str], log: Log, stop_at: float) -> None:
    """Post every label, retrying transport errors, 5xx and 404 (app not routed yet)."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        for i, image_id in enumerate(ids):
            body = {"image_id": image_id, **label_for(r, i)}
            delay = 0.05
            while time.monotonic() < stop_at:
                start = time.monotonic()
                try:
                    resp = client.post("/v1/review/labels", json=body)
                except httpx.TransportError:
                    log.record(start, -1)
                else:
                    log.record(start, resp.status_code)
                    if resp.is_success:
                        with log.lock:
                            log.acked[(r, image_id)] = body
                        break
                    assert resp.status_code >= 500 or resp.status_code == 404, resp.text
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


def ingress_replica():
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "SERVE_REPLICA" in a["name"] and "Ingress" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session) -> dict:
    from pathloop.data import ShardWriter
    from pathloop.feedback import FeedbackStore
    from pathloop.vocab import BONE_MARROW_16

    root: Path = tmp_path_factory.mktemp("load")
    rng = np.random.default_rng(5)
    with ShardWriter(root / "samples", BONE_MARROW_16) as w:
        for i in range(N_IMAGES):
            w.add(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), i % 16, "none", "synthetic")
    store = FeedbackStore(root / "feedback.db")
    raters = [store.add_rater(f"rater{r}") for r in range(N_RATERS)]
    return {"root": root, "store": store, "raters": raters}


@pytest.fixture(scope="module")
def url(world) -> str:
    from ray import serve

    from serve.app import build_app
    from serve.args import ServeArgs

    port = free_port()
    args = ServeArgs(
        port=port, feedback_url=str(world["root"] / "feedback.db"),
        review_samples_dir=str(world["root"] / "samples"), health_check_period_s=1.0,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=args.app_name, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_labels_survive_load_and_a_crash(url, world):
    import ray

    store = world["store"]
    round_id = store.rounds()[-1].id
    ids = [im.image_id for im in store.images(round_id)]
    assert len(ids) == N_IMAGES
    log, start = Log(), time.monotonic()
    threads = [
        threading.Thread(target=rater_loop, args=(url, tok, r, ids, log, start + DEADLINE_S))
        for r, (_, tok) in enumerate(world["raters"])
    ]
    [t.start() for t in threads]
    while len(log.acked) < KILL_AFTER and time.monotonic() - start < DEADLINE_S:
        time.sleep(0.05)
    killed_at = time.monotonic()
    rate_before = len(log.acked) / (killed_at - start)
    ray.kill(ingress_replica(), no_restart=True)  # the process dies mid-request
    [t.join() for t in threads]
    elapsed = time.monotonic() - start
    back = min((s for s, e, code in log.calls if s > killed_at and 200 <= code < 300), default=None)
    print(f"\n{len(log.acked)} labels in {elapsed:.1f} s; {rate_before:.0f} labels/s before the "
          f"crash; back {back - killed_at if back else float('nan'):.1f} s after it; "
          f"{sum(1 for *_, c in log.calls if c == -1 or c >= 500)} failed calls retried")

    # Every label acknowledged (and so every label: clients retried until acked).
    assert len(log.acked) == N_RATERS * N_IMAGES, f"only {len(log.acked)} acknowledged"
    # No 5xx from a request that did not overlap the crash window.
    outside = [(s, c) for s, e, c in log.calls if c >= 500 and (e < killed_at or s > back)]
    assert not outside, outside[:5]
    # The store holds exactly the acknowledged labels, each once, with the posted values.
    labels = store.labels(round_id)
    assert len(labels) == N_RATERS * N_IMAGES
    by_name = {rid: r for r, (rid, _) in enumerate(world["raters"])}
    for lab in labels:
        posted = log.acked[(by_name[lab.rater_id], lab.image_id)]
        assert lab.plausible == posted["plausible"]
        assert set(lab.failed_criteria) == set(posted["failed_criteria"])
        assert lab.revision == 1  # a retried, already stored label added no revision
    some = labels[:: 97]
    for lab in some:
        assert len(store.history(round_id, lab.image_id, lab.rater_id)) == 1
