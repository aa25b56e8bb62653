"""The review UI in real headless Chromium: two raters label one round, one by mouse only and
one by keys only, with zoom, pan, contrast, comments, skip, unsure and undo; then a pairwise and a
blinded real-vs-synthetic round. The store is checked after each.

The page and its API run in-process under uvicorn (``serve.api``, the same routes as behind Serve;
no model is needed to review). Debian's Chromium is used (``make browsers``); the tests are
skipped without it. The first round asks for a failed criterion with every implausible verdict.
Screenshots go to /tmp/review_ui.png and /tmp/review_ui_pairwise.png (docs/ holds copies).
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
PAIRWISE_SCREENSHOT = Path("/tmp/review_ui_pairwise.png")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} missing; `make test` installs it",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phantom_shards(
    path: Path, classes: list[int], per_class: int, seed: int, source: str = "synthetic"
) -> Path:
    from pathloop.data import ShardWriter
    from pathloop.phantoms import generate
    from pathloop.vocab import BONE_MARROW_16

    with ShardWriter(path, BONE_MARROW_16) as w:
        for cid in classes:  # in this order: the round's review order
            for img, c, sub in generate(per_class, size=32, seed=seed, classes=[cid]):
                w.add(img, c, split="none", source=source, subtype=sub)
    return path


def serve_review(args) -> tuple[str, object, threading.Thread]:
    """The review API and page under uvicorn on a free port: (url, server, thread)."""
    import uvicorn

    from serve.api import build_local_api

    port = free_port()
    config = uvicorn.Config(
        build_local_api(args), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    from pathloop.feedback import FeedbackStore
    from serve.args import ServeArgs

    root = tmp_path_factory.mktemp("ui")
    samples = phantom_shards(root / "samples", CLASSES, 1, seed=3)
    real = phantom_shards(root / "real", sorted(set(CLASSES)), 4, seed=99)
    store = FeedbackStore(root / "feedback.db")
    round_id = store.create_round(samples, settings={"require_criteria": True})
    raters = {name: store.add_rater(name) for name in ("dr-keys", "dr-mouse")}
    args = ServeArgs(
        feedback_url=str(root / "feedback.db"),
        review_round=round_id,
        real_examples=str(real),
        real_examples_per_class=4,
    )
    url, server, thread = serve_review(args)
    yield {
        "url": url,
        "store": store,
        "raters": raters,
        "round_id": round_id,
        "ids": [im.image_id for im in store.images(round_id)],
    }
    server.should_exit = True
    thread.join(10)


class Page:
    """A signed-out review page in Chromium and the waits the tests share."""

    def __init__(self, browser, url: str, ids: list[str]) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(f"{url}/review")
        self.ids = ids

    def idle(self) -> None:
        self.page.wait_for_function("document.body.dataset.busy === '0'", timeout=30_000)

    def shown(self, i: int | None) -> None:
        want = "" if i is None else self.ids[i]
        self.page.wait_for_function(
            "want => document.body.dataset.busy === '0' && "
            "document.getElementById('figure').dataset.imageId === want",
            arg=want,
            timeout=30_000,
        )

    def keys(self, *seq: str, then: int | None = None) -> None:
        for k in seq:
            self.page.keyboard.press(k)
            self.idle()
        if then is not None:
            self.shown(then)

    def click(self, selector: str, then: int | None = None) -> None:
        self.page.click(selector)
        self.idle()
        if then is not None:
            self.shown(then)

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)


def answer(action: str) -> str:
    return f"#main button[data-action='{action}']:visible"


def criterion(n: int) -> str:
    return f"#criteria button[data-key='{n}']"


def labels_of(site: dict, name: str) -> dict:
    rater_id = site["raters"][name][0]
    return {lab.image_id: lab for lab in site["store"].labels(site["round_id"], rater_id)}


def check(site: dict, name: str, want: dict) -> None:
    got, ids = labels_of(site, name), site["ids"]
    assert set(got) == {ids[i] for i in want}, name
    for i, (plausible, failed, subtype, answer_, comment) in want.items():
        lab = got[ids[i]]
        assert (lab.plausible, lab.failed_criteria, lab.subtype) == (plausible, failed, subtype), i
        assert (lab.answer, lab.comment, lab.source) == (answer_, comment, "human"), i


# ----------------------------------------------------------------------------- keys only


def test_a_round_by_keys_only(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        ui = Page(browser, site["url"], site["ids"])
        page = ui.page

        # --- before sign-in only the form shows (the hidden panel must not leak through)
        page.wait_for_selector("#signin:visible")
        assert not page.is_visible("#main") and not page.is_visible("#panel")
        page.keyboard.type("not-a-token")
        page.keyboard.press("Enter")
        page.wait_for_selector("#msg:has-text('not accepted')")
        page.keyboard.type(site["raters"]["dr-keys"][1])
        page.keyboard.press("Enter")
        ui.shown(0)
        assert ui.text("#progress") == "0 / 12 done"
        assert len(page.query_selector_all("#real-strip img")) == 4
        assert "Cell size" in ui.text("#criteria")
        page.wait_for_selector("#size-note:has-text('32 × 32 px, shown 12× enlarged')")

        # --- view: zoom, pan and contrast change the display only
        ui.keys("+", "+")
        assert ui.text("#zoom-level") == "2×" and "shown 24×" in ui.text("#size-note")
        ui.keys("Shift+ArrowRight", "Shift+ArrowDown")
        transform = page.eval_on_selector("#image", "el => el.style.transform")
        assert transform == "translate(-48px, -48px) scale(2)", transform
        ui.keys("0", "H")
        assert page.eval_on_selector("#image", "el => el.style.transform").endswith("scale(1)")
        assert page.get_attribute("#contrast", "aria-pressed") == "true"
        ui.keys("H")

        # --- label by keystrokes alone
        ui.keys("P", then=1)  # 0 plausible
        row = page.inner_text("#class-progress tr:has-text('basophilic myelocyte')")
        assert row.endswith("1 / 1"), row
        ui.keys("1", "3", "I", then=2)  # 1 implausible: cell_size, nc_ratio
        assert page.is_visible("#subtype-box") and "segmented" in ui.text("#subtypes")
        ui.keys("S", "P", then=3)  # 2 plausible, subtype segmented
        ui.keys("I")  # 3: implausible without a criterion is refused in this round ...
        assert "at least one" in ui.text("#msg") and ui.text("#status") == "Not answered yet"
        ui.keys("2", "I", then=4)  # ... so: nucleus_shape_size
        ui.keys("C")
        page.keyboard.type("odd halo; PIU")  # letters in the comment are text, not keys
        ui.keys("Escape", "P", then=5)  # 4 plausible, with the comment
        ui.keys("K", then=6)  # 5 skipped: it comes back at the end
        assert ui.text("#progress") == "5 / 12 done · 1 skipped"
        ui.keys("N", then=7)  # 6 unsure
        ui.keys("P", then=8)  # 7 plausible ...
        ui.keys("U", then=7)  # ... undone: back to 7, no label
        assert ui.text("#status") == "Not answered yet"
        ui.keys("4", "6", "+", "C")
        page.keyboard.type("granules look smeared")
        ui.keys("Escape")
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        ui.keys("Enter", then=8)  # 7 implausible: cytoplasm, inclusions, with the comment
        ui.keys("ArrowLeft", then=7)  # look back at 7 ...
        assert "implausible (revision 2)" in ui.text("#status")
        assert page.input_value("#comment") == "granules look smeared"
        ui.keys("ArrowRight", then=8)  # ... and forward again
        ui.keys("7", "I", then=9)  # 8 implausible: granules
        ui.keys("P", then=10)
        ui.keys("P", then=11)
        ui.keys("P", then=5)  # the skipped image comes back last
        assert ui.text("#progress") == "11 / 12 done · 1 skipped"
        ui.keys("5", "I", then=None)  # 5 implausible: chromatin; every image done
        assert page.is_visible("#done") and ui.text("#progress") == "12 / 12 done"

        # --- a reload keeps the token (sessionStorage) and resumes: nothing left
        page.reload()
        ui.shown(None)
        ui.keys("ArrowLeft", then=11)  # look back from the end: the round's last image
        assert not ui.errors, ui.errors
        browser.close()

    check(
        site,
        "dr-keys",
        {
            0: (True, (), None, None, ""),
            1: (False, ("cell_size", "nc_ratio"), None, None, ""),
            2: (True, (), "segmented", None, ""),
            3: (False, ("nucleus_shape_size",), None, None, ""),
            4: (True, (), None, None, "odd halo; PIU"),
            5: (False, ("chromatin",), None, None, ""),
            6: (None, (), None, "unsure", ""),
            7: (False, ("cytoplasm", "inclusions"), None, None, "granules look smeared"),
            8: (False, ("granules",), None, None, ""),
            9: (True, (), None, None, ""),
            10: (True, (), None, None, ""),
            11: (True, (), None, None, ""),
        },
    )
    store, rid, ids = site["store"], site["round_id"], site["ids"]
    rater_id = site["raters"]["dr-keys"][0]
    history = store.history(rid, ids[5], rater_id)
    assert [h.answer for h in history] == ["skip", None]  # the skip stays in the history
    assert [r.undone for r in store.history(rid, ids[7], rater_id)] == [True, False]


# ----------------------------------------------------------------------------- mouse only


def test_a_round_by_mouse_only(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        ui = Page(browser, site["url"], site["ids"])
        page = ui.page
        page.fill("#token", site["raters"]["dr-mouse"][1])  # the token is pasted, not typed
        ui.click("#signin button[type=submit]", then=0)

        ui.click(answer("verdict:plausible"), then=1)  # 0 plausible
        page.click(criterion(1))
        page.click(criterion(3))
        ui.click(answer("verdict:implausible"), then=2)  # 1 implausible: cell_size, nc_ratio
        page.click("#subtypes button:has-text('band')")
        ui.click(answer("verdict:plausible"), then=3)  # 2 plausible, band

        # --- view by mouse: buttons, wheel, drag
        page.click("[data-action=zoom-in]")
        page.click("[data-action=zoom-in]")
        assert ui.text("#zoom-level") == "2×"
        box = page.query_selector("#frame-a").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx, cy)
        page.mouse.wheel(0, -100)
        page.wait_for_function("document.getElementById('zoom-level').textContent === '3×'")
        page.mouse.down()
        page.mouse.move(cx + 60, cy + 30, steps=4)
        page.mouse.up()
        transform = page.eval_on_selector("#image", "el => el.style.transform")
        assert transform == "translate(60px, 30px) scale(3)", transform
        page.click("[data-action=zoom-fit]")
        page.click("#contrast")
        assert page.get_attribute("#contrast", "aria-pressed") == "true"
        page.click("#contrast")
        assert page.get_attribute("#contrast", "aria-pressed") == "false"

        ui.click(answer("verdict:implausible"))  # no criterion: refused in this round
        assert "at least one" in ui.text("#msg")
        page.click(criterion(7))
        ui.click(answer("verdict:implausible"), then=4)  # 3 implausible: granules
        page.click("#comment")
        page.fill("#comment", "nucleus too pale")
        ui.click(answer("verdict:plausible"), then=5)  # 4 plausible, with the comment
        ui.click(answer("answer:skip"), then=6)  # 5 skipped
        ui.click(answer("answer:unsure"), then=7)  # 6 unsure
        ui.click(answer("verdict:plausible"), then=8)  # 7 plausible ...
        ui.click(answer("undo"), then=7)  # ... undone
        ui.click(answer("prev"), then=6)
        assert "unsure" in ui.text("#status")
        ui.click(answer("next"), then=7)
        page.click(criterion(2))
        ui.click(answer("save"), then=8)  # 7 implausible: nucleus_shape_size
        for i in (8, 9, 10):
            ui.click(answer("verdict:plausible"), then=i + 1)
        ui.click(answer("verdict:plausible"), then=5)  # 11; then the skipped one
        page.click(criterion(5))
        ui.click(answer("verdict:implausible"), then=None)  # 5 implausible: chromatin
        assert page.is_visible("#done") and ui.text("#progress") == "12 / 12 done"
        ui.click(answer("undo"), then=5)  # undo from the end screen
        assert ui.text("#progress") == "11 / 12 done · 1 skipped"  # back to the skip
        page.click(criterion(5))
        ui.click(answer("verdict:implausible"), then=None)
        assert not ui.errors, ui.errors
        browser.close()

    check(
        site,
        "dr-mouse",
        {
            0: (True, (), None, None, ""),
            1: (False, ("cell_size", "nc_ratio"), None, None, ""),
            2: (True, (), "band", None, ""),
            3: (False, ("granules",), None, None, ""),
            4: (True, (), None, None, "nucleus too pale"),
            5: (False, ("chromatin",), None, None, ""),
            6: (None, (), None, "unsure", ""),
            7: (False, ("nucleus_shape_size",), None, None, ""),
            8: (True, (), None, None, ""),
            9: (True, (), None, None, ""),
            10: (True, (), None, None, ""),
            11: (True, (), None, None, ""),
        },
    )


# ----------------------------------------------------------------------------- other modes


def _open(store, round_id: int, real: Path, rater: str):
    from serve.args import ServeArgs

    _, token = store.add_rater(rater)
    args = ServeArgs(feedback_url=store.url, review_round=round_id, real_examples=str(real))
    return token, serve_review(args)


def test_pairwise_and_blinded_rounds_in_the_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    from pathloop.blinded import create_blinded_round
    from pathloop.feedback import FeedbackStore
    from pathloop.pairwise import create_pairwise_round

    samples = phantom_shards(tmp_path / "samples", [14, 9], 4, seed=5)
    real = phantom_shards(tmp_path / "real", [14, 9], 4, seed=6, source="phantom")
    store = FeedbackStore(tmp_path / "fb.db")
    pair_round = create_pairwise_round(store, samples, seed=2)
    blind_round, _ = create_blinded_round(store, samples, real, tmp_path / "blind", real_split=None)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)

        # --- pairwise: two images, one zoom; A/B/E by keys, then unsure, undo, neither by mouse
        token, (url, server, thread) = _open(store, pair_round, real, "dr-pairs")
        pairs = [im.image_id for im in store.images(pair_round)]
        assert len(pairs) == 4  # 4 images of each of 2 classes: 2 pairs each
        ui = Page(browser, url, pairs)
        ui.page.fill("#token", token)
        ui.page.keyboard.press("Enter")
        ui.shown(0)
        page = ui.page
        assert page.is_visible("#image-b") and ui.text("#caption-b") == "Right (B)"
        assert not page.is_visible("#criteria") and not page.is_visible("[data-key=P]")
        assert "more plausible" in ui.text("#question") and page.is_visible("#real-strip img")
        ui.keys("+")
        both = page.eval_on_selector_all("#figures img", "els => els.map(e => e.style.transform)")
        assert both == ["translate(0px, 0px) scale(1.5)"] * 2, both
        ui.keys("A", then=1)
        ui.keys("B", then=2)
        ui.keys("C")
        page.keyboard.type("both fine")
        ui.keys("Escape")
        page.screenshot(path=str(PAIRWISE_SCREENSHOT), full_page=True)
        ui.keys("E", then=3)
        ui.click("#main button[data-action='answer:unsure']", then=None)
        ui.click("#main button[data-action='undo']:visible", then=3)
        ui.click("#main button[data-action='answer:neither']", then=None)
        assert page.is_visible("#done") and ui.text("#progress") == "4 / 4 done"
        assert not ui.errors, ui.errors
        ui.page.close()
        server.should_exit = True
        thread.join(10)
        got = [lab.answer for lab in store.labels(pair_round)]
        assert got[:4] == ["a", "b", "both", "neither"]
        assert store.labels(pair_round)[2].comment == "both fine"

        # --- blinded: no real examples, no hint; R / G by keys, then by mouse
        token, (url, server, thread) = _open(store, blind_round, real, "dr-blind")
        images = store.images(blind_round)
        ui = Page(browser, url, [im.image_id for im in images])
        ui.page.fill("#token", token)
        ui.page.keyboard.press("Enter")
        ui.shown(0)
        page = ui.page
        assert not page.is_visible("#real") and not page.is_visible("#image-b")
        assert "real cell or a synthetic" in ui.text("#question")
        ui.keys("R", then=1)
        ui.keys("G", then=2)
        ui.click("#main button[data-action='answer:real']", then=3)
        ui.click("#main button[data-action='answer:synthetic']", then=4)
        assert not ui.errors, ui.errors
        browser.close()
        server.should_exit = True
        thread.join(10)
    got = [lab.answer for lab in store.labels(blind_round)]
    assert got == ["real", "synthetic", "real", "synthetic"]
    stats = store.round_stats(blind_round)["blinded"]
    correct = sum(
        lab.answer == im.truth for lab, im in zip(store.labels(blind_round), images, strict=False)
    )
    assert (stats["pooled"]["n"], stats["pooled"]["correct"]) == (4, correct)
