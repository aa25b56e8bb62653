"""Expert review over HTTP: the round one ingress serves, its routes and the browser UI.

``Review`` holds the round: its items in review order, their PNGs, real examples per class and
what each rater has answered. ``review_routes`` adds ``/v1/review/*`` over it (rater bearer
tokens, labels stored in the FeedbackStore); ``ui_routes`` serves the review page at ``/review``.

The round's mode decides the question: plausible or not (with failed criteria and subtype), real
or synthetic (a blinded round: no real examples are shown and the truth is never sent), or which
of two images of one class is more plausible (a pairwise round: an item is a pair). Every mode
takes "unsure" (final, no verdict) and "skip" (the item comes back after the others).
"""

from __future__ import annotations

import base64
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from pathloop import schemas as S
from pathloop.pairwise import pair_ids
from pathloop.vocab import CRITERIA, CRITERIA_TEXT, Vocabulary
from serve.args import ServeArgs
from serve.errors import ERRORS, UNAUTH, InputError
from serve.inputs import LabelRequest, UndoRequest, json_only

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
# Review UI keys no subtype may take: plausible, implausible, undo, not sure, skip, comment,
# high contrast (review.js).
RESERVED_KEYS = set("PIUNKCH")


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


@dataclass(frozen=True)
class Progress:
    """One rater's progress through the round."""

    done: int  # items answered (a verdict, unsure, or the mode's answer)
    skipped: int  # items skipped: asked again once the others are done
    total: int
    next_id: str | None  # the first item neither done nor skipped, else the first skipped


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
        self.round_name, self.mode = info.name, info.mode
        self.require_criteria = bool(
            (info.settings or {}).get("require_criteria", False)
            if args.review_require_criteria is None
            else args.review_require_criteria
        )
        self.vocab = self.store.vocabulary(self.round_id)
        self.images = self.store.images(self.round_id)  # review order; fixed for a round
        self.index = {im.image_id: i for i, im in enumerate(self.images)}
        self.pngs = _read_pngs(info.samples_dir)
        # A blinded round shows no real examples: they would be the answer to compare against.
        k = 0 if self.mode == "blinded" else args.real_examples_per_class
        self.real = _real_examples(args.real_examples, self.vocab, k)
        self.keys = {c.name: subtype_keys(c.subtypes) for c in self.vocab.classes}
        self._state: dict[int, dict[str, str]] = {}  # rater id -> {item: done/skip} (refresh)
        self._lock = threading.Lock()
        log.info("review: %s round %d (%d items)", self.mode, self.round_id, len(self.images))

    def position(self, image_id: str) -> int:
        if image_id not in self.index:
            ids = ", ".join(repr(im.image_id) for im in self.images[:3])
            raise InputError(
                f"image {image_id!r} is not in round {self.round_id} ({len(self.images)} "
                f"images; valid ids are the shard ids of its samples, e.g. {ids})"
            )
        return self.index[image_id]

    # FeedbackStore.progress loads every image and label of the round (~0.1 s at 500 images),
    # too slow for each POST under load. Each replica keeps, per rater, the items answered or
    # skipped: read from the store on every GET (so it is never stale for long, even with several
    # replicas) and updated from the store's answer on every write.

    def refresh(self, rater_id: int) -> dict[str, Any]:
        """This rater's current labels by image id (from the store); updates the cache."""
        labels = {lab.image_id: lab for lab in self.store.labels(self.round_id, rater_id)}
        with self._lock:
            self._state[rater_id] = {i: lab.state for i, lab in labels.items() if lab.state}
        return labels

    def update(self, rater_id: int, image_id: str, lab: Any) -> None:
        """Record the label now in force (None: no label left) of one item."""
        if rater_id not in self._state:
            self.refresh(rater_id)
        with self._lock:
            if lab is not None and lab.state:
                self._state[rater_id][image_id] = lab.state
            else:
                self._state[rater_id].pop(image_id, None)

    def _states(self, rater_id: int) -> dict[str, str]:
        if rater_id not in self._state:
            self.refresh(rater_id)
        with self._lock:
            return dict(self._state[rater_id])

    def progress(self, rater_id: int) -> Progress:
        """Items done and skipped, and where to go next: unanswered items first, in review
        order, then the skipped ones."""
        state = self._states(rater_id)
        ids = [im.image_id for im in self.images]
        first = next((i for i in ids if i not in state), None)
        first = first or next((i for i in ids if state.get(i) == "skip"), None)
        done = sum(state.get(i) == "done" for i in ids)
        skipped = sum(state.get(i) == "skip" for i in ids)
        return Progress(done, skipped, len(ids), first)

    def class_progress(self, rater_id: int) -> list[S.ClassProgress]:
        """Items answered by this rater and in all, per class with items, in vocabulary order."""
        state = self._states(rater_id)
        done: dict[int, int] = {}
        total: dict[int, int] = {}
        for im in self.images:
            total[im.class_id] = total.get(im.class_id, 0) + 1
            done[im.class_id] = done.get(im.class_id, 0) + (state.get(im.image_id) == "done")
        return [
            S.ClassProgress(name=c.name, code=c.code, done=done[c.id], total=total[c.id])
            for c in self.vocab.classes
            if c.id in total
        ]


def label_out(lab: Any) -> S.LabelOut:
    return S.LabelOut(
        plausible=lab.plausible,
        failed_criteria=list(lab.failed_criteria),
        subtype=lab.subtype,
        comment=lab.comment,
        revision=lab.revision,
        answer=lab.answer,
    )


def criteria_info() -> list[S.CriterionInfo]:
    return [
        S.CriterionInfo(key=c, text=CRITERIA_TEXT[c], hotkey=str(i + 1))
        for i, c in enumerate(CRITERIA)
    ]


# ----------------------------------------------------------------------------- rater auth

_rater_bearer = HTTPBearer(auto_error=False, scheme_name="rater_token")


def _rater_auth(review: Review | None) -> Any:
    def check(cred: HTTPAuthorizationCredentials | None = Depends(_rater_bearer)) -> Any:
        rv = _review_of(review)
        if cred is None or not cred.credentials:
            raise HTTPException(
                401, "missing rater token: send Authorization: Bearer <token>", UNAUTH
            )
        rater = rv.store.rater_for_token(cred.credentials)
        if rater is None:
            raise HTTPException(
                401,
                "rater token not recognised, expired or revoked: ask the round's organiser for "
                "a new one (pathloop review rater NAME --new-token)",
                headers=UNAUTH,
            )
        return rater

    return check


def _review_of(review: Review | None) -> Review:
    if review is None:
        raise HTTPException(
            503, "review is not configured: set feedback_url and review_samples_dir (or round)"
        )
    return review


# ----------------------------------------------------------------------------- review routes


def review_routes(app: FastAPI, review: Review | None, route_prefix: str) -> None:
    """The /v1/review/* routes over ``review`` (503 without one), rater tokens required."""
    rater_dep = Depends(_rater_auth(review))
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
        rv = _review_of(review)
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
            mode=rv.mode,
            require_criteria=rv.require_criteria,
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
        """The asked item, else the first this rater has not answered (resume point), else the
        first skipped one."""
        rv = _review_of(review)
        labels = rv.refresh(rater.id)
        prog = rv.progress(rater.id)
        target = image_id or prog.next_id
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
                prev_id=rv.images[-1].image_id if rv.images else None,  # look back from the end
                next_id=None,
                label=None,
                done=prog.done,
                total=prog.total,
                real_examples=[],
                skipped=prog.skipped,
                class_progress=rv.class_progress(rater.id),
            )
        lab = labels.get(target)
        label = None if lab is None else label_out(lab)
        return _next_response(rv, route_prefix, target, label, prog, rater.id)

    @app.post(
        "/v1/review/labels",
        response_model=S.LabelResponse,
        name="review_post_label",
        tags=tags,
        dependencies=[Depends(json_only)],
        responses=ERRORS,
    )
    def post_label(req: LabelRequest, rater: Any = rater_dep) -> S.LabelResponse:
        """Store (upsert) this rater's label: a verdict (plausible) or an answer; resending the
        same label changes nothing."""
        rv = _review_of(review)
        _check_request(rv, req)
        lab = rv.store.put_label(
            rv.round_id,
            req.image_id,
            rater.id,
            req.plausible,
            req.failed_criteria,
            subtype=req.subtype,
            comment=req.comment,
            source="human",
            answer=req.answer,
        )
        rv.update(rater.id, req.image_id, lab)
        prog = rv.progress(rater.id)
        return S.LabelResponse(
            image_id=req.image_id,
            label=label_out(lab),
            done=prog.done,
            total=prog.total,
            next_id=prog.next_id,
        )

    @app.post(
        "/v1/review/undo",
        response_model=S.UndoResponse,
        name="review_undo",
        tags=tags,
        dependencies=[Depends(json_only)],
        responses=ERRORS,
    )
    def undo(req: UndoRequest, rater: Any = rater_dep) -> S.UndoResponse:
        """Step this rater's label of an image back one revision (none left: no label)."""
        rv = _review_of(review)
        lab = rv.store.undo(rv.round_id, req.image_id, rater.id)
        rv.update(rater.id, req.image_id, lab)
        prog = rv.progress(rater.id)
        return S.UndoResponse(
            image_id=req.image_id,
            label=None if lab is None else label_out(lab),
            done=prog.done,
            total=prog.total,
            next_id=prog.next_id,
        )

    @app.get(
        "/v1/review/progress",
        response_model=S.ProgressResponse,
        name="review_progress",
        tags=tags,
        responses=ERRORS,
    )
    def progress(rater: Any = rater_dep) -> S.ProgressResponse:
        """Items answered by this rater, items in the round, and where to resume."""
        rv = _review_of(review)
        rv.refresh(rater.id)
        prog = rv.progress(rater.id)
        return S.ProgressResponse(
            round_id=rv.round_id,
            rater=rater.name,
            done=prog.done,
            total=prog.total,
            next_id=prog.next_id,
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
        rv = _review_of(review)
        png = rv.pngs.get(image_id)
        if png is None:
            msg = f"image {image_id!r} is not in round {rv.round_id}: take ids from /v1/review/next"
            raise HTTPException(404, msg)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private"})


def _check_request(rv: Review, req: LabelRequest) -> None:
    """A verdict or an answer, and criteria for an implausible verdict where the round asks."""
    if (req.plausible is None) == (req.answer is None):
        raise InputError(
            "send plausible (true/false) or answer (unsure, skip; real/synthetic in a blinded "
            "round; a/b/both/neither in a pairwise round), exactly one of them"
        )
    if rv.require_criteria and req.plausible is False and not req.failed_criteria:
        valid = ", ".join(c.key for c in criteria_info())
        raise InputError(
            f"this round asks which criteria an implausible cell fails: send at least one in "
            f"failed_criteria ({valid})"
        )


def _b64(png: bytes | None) -> str | None:
    return None if png is None else base64.b64encode(png).decode("ascii")


def _next_response(
    rv: Review,
    route_prefix: str,
    image_id: str,
    label: S.LabelOut | None,
    prog: Progress,
    rater_id: int,
) -> S.NextResponse:
    pos = rv.position(image_id)
    img = rv.images[pos]
    info = rv.vocab.lookup(img.class_id)
    pair = list(pair_ids(image_id)) if rv.mode == "pairwise" else None
    left = pair[0] if pair else image_id
    return S.NextResponse(
        image_id=image_id,
        position=pos,
        class_name=info.name,
        class_code=info.code,
        description=info.description,
        subtypes=rv.keys[info.name] if rv.mode == "plausibility" else [],
        image_b64=_b64(rv.pngs.get(left)),
        url=f"{route_prefix.rstrip('/')}/v1/review/image/{left}.png",
        prev_id=rv.images[pos - 1].image_id if pos > 0 else None,
        next_id=rv.images[pos + 1].image_id if pos + 1 < len(rv.images) else None,
        label=label,
        done=prog.done,
        total=prog.total,
        real_examples=rv.real.get(info.name, []),
        image_b_b64=_b64(rv.pngs.get(pair[1])) if pair else None,
        pair=pair,
        skipped=prog.skipped,
        class_progress=rv.class_progress(rater_id),
    )


# ----------------------------------------------------------------------------- UI


def ui_routes(app: FastAPI) -> None:
    """The review page at /review (/ redirects there) and its static files."""

    @app.get("/review", name="review_ui", include_in_schema=False)
    def review_ui() -> FileResponse:
        return FileResponse(STATIC / "review.html", media_type="text/html")

    @app.get("/", name="root", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("review")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
