"""The review UI in real headless Chromium: sign in, label 10 images by keyboard, check the store.

The page and its API run in-process under uvicorn (``serve.api``, the same routes as behind Serve;
no model is needed to review). Debian's Chromium is used (``make browsers``); the test is skipped
without it. A screenshot goes to /tmp/review_ui.png.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CLASSES = [0, 3, 14, 5, 10, 4, 7, 9, 11, 12, 1, 2]  # one phantom each; image 2 is a neutrophil
SCREENSHOT = Path("/tmp/review_ui.png")

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} missing; `make test` installs it",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phantom_shards(path: Path, classes: list[int], per_class: int, seed: int) -> Path:
    from pathloop.data import ShardWriter
    from pathloop.phantoms import generate
    from pathloop.vocab import BONE_MARROW_16

    with ShardWriter(path, BONE_MARROW_16) as w:
        for cid in classes:  # in this order: the round's review order
            for img, c, sub in generate(per_class, size=32, seed=seed, classes=[cid]):
                w.add(img, c, split="none", source="synthetic", subtype=sub)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    import uvicorn

    from pathloop.feedback import FeedbackStore
    from serve.api import build_local_api
    from serve.args import ServeArgs

    root = tmp_path_factory.mktemp("ui")
    samples = phantom_shards(root / "samples", CLASSES, 1, seed=3)
    real = phantom_shards(root / "real", sorted(set(CLASSES)), 4, seed=99)
    store = FeedbackStore(root / "feedback.db")
    rater_id, token = store.add_rater("dr-ui")
    args = ServeArgs(
        feedback_url=str(root / "feedback.db"),
        review_samples_dir=str(samples),
        real_examples=str(real),
        real_examples_per_class=4,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            build_local_api(args),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    round_id = store.rounds()[-1].id
    yield {
        "url": f"http://127.0.0.1:{port}",
        "store": store,
        "token": token,
        "rater_id": rater_id,
        "round_id": round_id,
        "ids": [im.image_id for im in store.images(round_id)],
    }
    server.should_exit = True
    thread.join(10)


def test_rater_labels_ten_images_by_keyboard(site):
    from playwright.sync_api import sync_playwright

    ids, store = site["ids"], site["store"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def shown(i: int | None) -> None:
            want = "" if i is None else ids[i]
            page.wait_for_function(
                "want => document.body.dataset.busy === '0' && "
                "document.getElementById('figure').dataset.imageId === want",
                arg=want,
                timeout=10_000,
            )

        def keys(*seq: str, then: int | None = None) -> None:
            for k in seq:
                page.keyboard.press(k)
                page.wait_for_function("document.body.dataset.busy === '0'")
            if then is not None:
                shown(then)

        # --- sign in: a wrong token is refused in the page, the right one resumes at image 0
        page.goto(f"{site['url']}/review")
        page.fill("#token", "not-a-token")
        page.keyboard.press("Enter")
        page.wait_for_selector("#msg:has-text('not accepted')")
        page.fill("#token", site["token"])
        page.keyboard.press("Enter")
        shown(0)
        assert page.inner_text("#progress") == "0 / 12 labelled"
        assert len(page.query_selector_all("#real-strip img")) == 4
        assert "Cell size" in page.inner_text("#criteria")

        # --- label 10 images by keystrokes alone
        keys("P", then=1)  # 0 plausible
        keys("1", "3", "I", then=2)  # 1 implausible: cell_size, nc_ratio
        assert page.is_visible("#subtype-box") and "segmented" in page.inner_text("#subtypes")
        keys("S", "P", then=3)  # 2 plausible, subtype segmented
        keys("2", "2", "7", "I", then=4)  # 3 implausible: granules (2 toggled off)
        keys("P", then=5)  # 4 plausible ...
        keys("U", then=4)  # ... undone: back to 4, no label
        assert page.inner_text("#status") == "Not labelled yet"
        keys("5", "Enter", then=5)  # 4 implausible: chromatin
        keys("I", then=6)  # 5 implausible, no criteria
        keys("ArrowLeft", then=5)  # look back at 5 ...
        assert "implausible" in page.inner_text("#status")
        keys("ArrowRight", then=6)  # ... and forward again
        keys("P", then=7)  # 6 plausible
        keys("4", "6")  # 7: toggle two criteria
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        keys("I", then=8)  # 7 implausible: cytoplasm, inclusions
        keys("P", then=9)  # 8 plausible
        keys("I", then=10)  # 9 implausible
        assert page.inner_text("#progress") == "10 / 12 labelled"

        # --- a reload resumes at the first unlabelled image (token kept in sessionStorage)
        page.reload()
        shown(10)
        assert not errors, errors
        browser.close()

    got = {lab.image_id: lab for lab in store.labels(site["round_id"], site["rater_id"])}
    want = {
        0: (True, (), None),
        1: (False, ("cell_size", "nc_ratio"), None),
        2: (True, (), "segmented"),
        3: (False, ("granules",), None),
        4: (False, ("chromatin",), None),
        5: (False, (), None),
        6: (True, (), None),
        7: (False, ("cytoplasm", "inclusions"), None),
        8: (True, (), None),
        9: (False, (), None),
    }
    assert set(got) == {ids[i] for i in want}
    for i, (plausible, failed, subtype) in want.items():
        lab = got[ids[i]]
        assert (lab.plausible, lab.failed_criteria, lab.subtype) == (plausible, failed, subtype), i
        assert lab.source == "human"
    assert got[ids[4]].revision == 2  # the undone revision 1 stays in the history
    assert [r.undone for r in store.history(site["round_id"], ids[4], site["rater_id"])] == [
        True,
        False,
    ]
