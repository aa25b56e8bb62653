"""The feedback store: rounds of images, raters, labels with history, aggregation and exports.

A *round* is one shard set of samples put up for review (``create_round``). Raters (people with a
bearer token, which expires and can be revoked, or machine evaluators) give each image at most one
*current label* per rater; every change is a new *revision* kept in ``label_history``, so
``undo`` can step back. ``export_round`` turns the labels into the Parquet table the reward model
trains on, plus inter-rater agreement. A round's mode says what raters answer: plausible or not
(or unsure, or skip), real or synthetic (``blinded``), or which of two images (``pairwise``).

The tables, the records the store returns and the engine live in ``feedback_db``; Label
Studio interop in ``labelstudio``; agreement statistics in ``metrics``.

Every write is one transaction; SQLite runs in WAL mode with a busy timeout, writes take the lock
up front (``BEGIN IMMEDIATE``) and "database is locked" is retried, so several threads and
processes can label at once.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import random
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import (
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pathloop.feedback_db import (
    AGGREGATIONS,
    LABEL_VALUES,
    ORDERS,
    RATER_KINDS,
    ROUND_MODES,
    ROUND_STATUSES,
    SOURCES,
    TOKEN_DAYS,
    WRITE_ATTEMPTS,
    Base,
    FeedbackError,
    ImageRow,
    Label,
    LabelHistoryRow,
    LabelRow,
    Rater,
    RaterRow,
    Revision,
    RoundImage,
    RoundInfo,
    RoundRow,
    TokenInfo,
    add_missing_columns,
    as_utc,
    check_answer,
    check_choice,
    check_criteria,
    check_plausible,
    check_subtype,
    find_token,
    hash_token,
    is_retryable,
    label_record,
    make_engine,
    normalise_url,
    rater_record,
    some_of,
    token_expiry,
    token_record,
    utc_now,
)
from pathloop.metrics import agreement_of
from pathloop.vocab import CRITERIA, Vocabulary

log = logging.getLogger(__name__)


FEEDBACK_FILE = "feedback.parquet"
AGREEMENT_FILE = "agreement.json"

T = TypeVar("T")

# ----------------------------------------------------------------------------- aggregation


def _majority(values: Iterable[str]) -> str | None:
    """The most common value; a tie (or nothing) gives None: no agreed subtype."""
    top = Counter(values).most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


def aggregate_labels(labels: Sequence[Label], how: str = "majority") -> dict:
    """Aggregate the scored labels of one image.

    ``plausible_soft`` is the mean vote. ``plausible`` is the training target: with
    ``how="majority"`` 1.0 when more than half voted plausible, else 0.0 (a tie counts as
    implausible: the conservative choice, since the reward model should not learn from doubtful
    cells); with ``how="mean"`` it is the soft label itself (0.5 on a 1:1 tie).
    ``fail_<criterion>`` is the fraction of raters who marked that criterion failed.
    """
    check_choice("aggregation", how, AGGREGATIONS)
    votes = [lab for lab in labels if lab.plausible is not None]
    n = len(votes)
    soft = float(np.mean([lab.plausible for lab in votes])) if n else float("nan")
    hard = soft if how == "mean" or not n else float(soft > 0.5)  # majority: a tie is 0.0
    row: dict[str, Any] = {"plausible": hard, "plausible_soft": soft, "n_raters": n}
    row["subtype"] = _majority(lab.subtype for lab in votes if lab.subtype)
    for c in CRITERIA:
        row[f"fail_{c}"] = (sum(c in lab.failed_criteria for lab in votes) / n) if n else 0.0
    return row


# ----------------------------------------------------------------------------- the store


class FeedbackStore:
    """Rounds, raters and labels in one database; see the module docstring for the schema."""

    def __init__(self, url: str | Path, create: bool = True) -> None:
        """Open the store at ``url``; ``create=False`` refuses a SQLite file that does not exist
        (a mistyped path would otherwise become a new, empty store)."""
        self.url = normalise_url(url)
        path = self.url.removeprefix("sqlite:///")
        if not create and path != self.url and path != ":memory:" and not Path(path).exists():
            raise FileNotFoundError(
                f"no feedback store at {path}; check the path, or create the store with "
                "`pathloop review create --samples <shard set> --store <path>`"
            )
        self.engine = make_engine(self.url)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(
            self.engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False
        )
        self._vocabs: dict[int, Vocabulary] = {}
        # Several processes may open a new database at once; CREATE TABLE races are retried.
        self._retry(lambda: Base.metadata.create_all(self.engine))
        self._retry(lambda: add_missing_columns(self.engine))  # a database from older pathloop
        self._write(self._date_old_tokens)

    @staticmethod
    def _date_old_tokens(s: Session) -> None:
        """Tokens issued before tokens expired get the default lifetime from now (once)."""
        now = utc_now()
        undated = RaterRow.token_hash.is_not(None), RaterRow.token_expires.is_(None)
        for row in s.scalars(select(RaterRow).where(*undated)):
            row.token_created = row.token_created or row.created
            row.token_expires = token_expiry(now, TOKEN_DAYS)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeedbackStore({self.engine.url.render_as_string(hide_password=True)!r})"

    # ------------------------------------------------------------------ transactions

    def _retry(self, fn: Callable[[], T]) -> T:
        delay = 0.02
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return fn()
            except (OperationalError, IntegrityError) as err:
                if attempt == WRITE_ATTEMPTS - 1 or not is_retryable(err):
                    raise
                log.debug("retrying a write after %s (attempt %d)", type(err).__name__, attempt)
            time.sleep(delay * (1 + random.random()))  # jitter: writers do not retry in step
            delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in one write transaction; lock and race errors rerun the whole of it."""

        def once() -> T:
            with self._write_sessions.begin() as session:
                return fn(session)

        return self._retry(once)

    # ------------------------------------------------------------------ rounds

    def create_round(
        self,
        samples_dir: str | Path,
        name: str | None = None,
        mode: str = "plausibility",
        settings: dict | None = None,
        items: Sequence[dict] | None = None,
    ) -> int:
        """Open a round on a shard set: every image in it, in shard order, awaits labels.

        ``mode`` is what raters answer (ROUND_MODES; ``pathloop.blinded`` and
        ``pathloop.pairwise`` make those rounds), ``settings`` its options (require_criteria);
        ``items`` (dicts of image_id, class_id, class_name, truth) replace the shard set's images.
        """
        from pathloop.data import iter_records, read_manifest

        check_choice("round mode", mode, ROUND_MODES)
        d = Path(samples_dir).resolve()
        manifest = read_manifest(d)
        vocab = Vocabulary.model_validate({"classes": manifest["classes"]})
        if items is None:
            columns = ["id", "class_id", "class_name"]
            items = [
                {"image_id": r["id"], "class_id": r["class_id"], "class_name": r["class_name"]}
                for r in iter_records(d, columns=columns)
            ]
        rows = [{**r, "position": i} for i, r in enumerate(items)]

        def work(s: Session) -> int:
            rnd = RoundRow(
                name=name or d.name,
                samples_dir=str(d),
                status="open",
                vocabulary=vocab.model_dump(mode="json"),
                mode=mode,
                settings=dict(settings or {}),
            )
            s.add(rnd)
            s.flush()
            if rows:
                s.execute(insert(ImageRow), [{**r, "round_id": rnd.id} for r in rows])
            return rnd.id

        round_id = self._write(work)
        log.info("round %d: %d images from %s", round_id, len(rows), d)
        return round_id

    def _round(self, s: Session, round_id: int) -> RoundRow:
        rnd = s.get(RoundRow, round_id)
        if rnd is None:
            ids = s.scalars(select(RoundRow.id).order_by(RoundRow.id)).all()
            raise FeedbackError(
                f"unknown round {round_id!r}; existing rounds: {some_of(ids) or 'none'}"
            )
        return rnd

    def round_info(self, round_id: int) -> RoundInfo:
        with self._read() as s:
            r = self._round(s, round_id)
            n = s.scalar(select(func.count()).where(ImageRow.round_id == round_id)) or 0
            return RoundInfo(
                id=r.id,
                name=r.name,
                samples_dir=r.samples_dir,
                created=as_utc(r.created),
                status=r.status,
                n_images=n,
                mode=r.mode or "plausibility",
                settings=dict(r.settings or {}),
            )

    def rounds(self) -> list[RoundInfo]:
        with self._read() as s:
            ids = s.scalars(select(RoundRow.id).order_by(RoundRow.id)).all()
        return [self.round_info(i) for i in ids]

    def set_status(self, round_id: int, status: str) -> None:
        """Open or close a round; a closed round takes no new labels."""
        check_choice("round status", status, ROUND_STATUSES)

        def work(s: Session) -> None:
            self._round(s, round_id).status = status

        self._write(work)

    def vocabulary(self, round_id: int) -> Vocabulary:
        """The class vocabulary of the round's shard set (cached: it never changes)."""
        if round_id not in self._vocabs:
            with self._read() as s:
                data = self._round(s, round_id).vocabulary
            self._vocabs[round_id] = Vocabulary.model_validate(data)
        return self._vocabs[round_id]

    def images(self, round_id: int) -> list[RoundImage]:
        """The round's images in review order."""
        with self._read() as s:
            self._round(s, round_id)
            rows = s.scalars(
                select(ImageRow).where(ImageRow.round_id == round_id).order_by(ImageRow.position)
            ).all()
            return [
                RoundImage(r.image_id, r.class_id, r.class_name, r.position, r.truth) for r in rows
            ]

    # ------------------------------------------------------------------ raters

    def add_rater(
        self, name: str, kind: str = "human", expires_days: float = TOKEN_DAYS
    ) -> tuple[int, str]:
        """Register a rater; returns (rater_id, bearer token). The token is shown only here and
        works for ``expires_days`` days, unless revoked (``revoke_token``)."""
        check_choice("rater kind", kind, RATER_KINDS)
        if not name.strip():
            raise FeedbackError("rater name must not be empty")
        token, now = secrets.token_urlsafe(32), utc_now()
        expires = token_expiry(now, expires_days)

        def work(s: Session) -> int:
            if s.scalar(select(RaterRow.id).where(RaterRow.name == name)) is not None:
                raise FeedbackError(f"rater {name!r} exists; pick another name or issue_token()")
            row = RaterRow(name=name, kind=kind, token_hash=hash_token(token))
            row.token_created, row.token_expires = now, expires
            s.add(row)
            s.flush()
            return row.id

        return self._write(work), token

    def issue_token(self, rater_id: int, expires_days: float = TOKEN_DAYS) -> str:
        """A new bearer token for a rater, working for ``expires_days`` days (the old one stops
        working; a revoked rater signs in again with the new one)."""
        token, now = secrets.token_urlsafe(32), utc_now()
        expires = token_expiry(now, expires_days)

        def work(s: Session) -> None:
            row = self._rater(s, rater_id)
            row.token_hash, row.token_created, row.token_expires = hash_token(token), now, expires
            row.token_revoked = None

        self._write(work)
        return token

    def tokens(self) -> list[TokenInfo]:
        """Every rater token on record: issued, expires, revoked; never the token itself."""
        with self._read() as s:
            rows = s.scalars(
                select(RaterRow).where(RaterRow.token_hash.is_not(None)).order_by(RaterRow.id)
            )
            return [token_record(r) for r in rows]

    def revoke_token(self, who: str) -> TokenInfo:
        """Revoke the token named by its rater's name or its ``token_id``; it stops working at
        once (revoking twice keeps the first time)."""

        def work(s: Session) -> TokenInfo:
            row = find_token(s, who)
            row.token_revoked = row.token_revoked or utc_now()
            return token_record(row)

        return self._write(work)

    def ensure_rater(self, name: str, kind: str = "human") -> int:
        """The id of rater ``name``, created without a token if new (machines, imports)."""
        check_choice("rater kind", kind, RATER_KINDS)

        def work(s: Session) -> int:
            row = s.scalar(select(RaterRow).where(RaterRow.name == name))
            if row is None:
                row = RaterRow(name=name, kind=kind, token_hash=None)
                s.add(row)
                s.flush()
            elif row.kind != kind:
                raise FeedbackError(f"rater {name!r} exists with kind {row.kind!r}, not {kind!r}")
            return row.id

        return self._write(work)

    def rater_for_token(self, token: str) -> Rater | None:
        """The rater holding ``token`` while it is neither expired nor revoked, else None."""
        if not token:
            return None
        digest = hash_token(token)
        with self._read() as s:
            row = s.scalar(select(RaterRow).where(RaterRow.token_hash == digest))
        # The lookup compares hashes of the secret, which leak nothing useful through timing;
        # compare_digest keeps the final check constant-time anyway.
        if row is None or not hmac.compare_digest(row.token_hash or "", digest):
            return None
        if token_record(row).status(utc_now()) != "active":
            return None  # expired or revoked
        return rater_record(row)

    def raters(self) -> list[Rater]:
        with self._read() as s:
            return [rater_record(r) for r in s.scalars(select(RaterRow).order_by(RaterRow.id))]

    def _rater(self, s: Session, rater_id: int) -> RaterRow:
        row = s.get(RaterRow, rater_id)
        if row is None:
            known = [
                f"{r.id} ({r.name})" for r in s.scalars(select(RaterRow).order_by(RaterRow.id))
            ]
            raise FeedbackError(f"unknown rater id {rater_id!r}; known raters: {some_of(known)}")
        return row

    # ------------------------------------------------------------------ labels

    def _image(self, s: Session, round_id: int, image_id: str) -> ImageRow:
        row = s.scalar(
            select(ImageRow).where(ImageRow.round_id == round_id, ImageRow.image_id == image_id)
        )
        if row is None:
            ids = s.scalars(
                select(ImageRow.image_id)
                .where(ImageRow.round_id == round_id)
                .order_by(ImageRow.position)
                .limit(4)
            ).all()
            n = s.scalar(select(func.count()).where(ImageRow.round_id == round_id))
            raise FeedbackError(
                f"image {image_id!r} is not in round {round_id} ({n} images; valid ids are the "
                f"shard ids of its samples, e.g. {some_of(ids, 3)})"
            )
        return row

    def _label_row(
        self, s: Session, round_id: int, image_id: str, rater_id: int
    ) -> LabelRow | None:
        return s.scalar(
            select(LabelRow).where(
                LabelRow.round_id == round_id,
                LabelRow.image_id == image_id,
                LabelRow.rater_id == rater_id,
            )
        )

    def put_label(
        self,
        round_id: int,
        image_id: str,
        rater_id: int,
        plausible: bool | None,
        failed_criteria: Iterable[str] = (),
        subtype: str | None = None,
        comment: str = "",
        source: str = "human",
        answer: str | None = None,
    ) -> Label:
        """Set a rater's label of an image (upsert); identical values add no revision.

        ``answer`` instead of a verdict: unsure, skip, or the round mode's answer (ANSWERS).
        Raises FeedbackError, writing nothing, for an unknown round/image/rater/criterion/source,
        an answer the round does not take, a subtype the class does not have, or a closed round.
        """
        values = {
            "plausible": check_plausible(plausible),
            "failed_criteria": list(check_criteria(failed_criteria)),
            "comment": comment or "",
            "source": source,
            "answer": answer,
        }
        check_choice("source", source, SOURCES)
        vocab = self.vocabulary(round_id)

        def work(s: Session) -> Label:
            rnd = self._round(s, round_id)
            if rnd.status != "open":
                raise FeedbackError(f"round {round_id} is closed; reopen it to add labels")
            check_answer(rnd.mode, values["plausible"], answer)
            img = self._image(s, round_id, image_id)
            self._rater(s, rater_id)
            vals = {**values, "subtype": check_subtype(vocab.lookup(img.class_id), subtype)}
            return self._upsert(s, round_id, image_id, rater_id, vals)

        return self._write(work)

    def _upsert(self, s: Session, round_id: int, image_id: str, rater_id: int, vals: dict) -> Label:
        row = self._label_row(s, round_id, image_id, rater_id)
        if row is not None and all(getattr(row, k) == v for k, v in vals.items()):
            return label_record(row)  # idempotent: a resent request changes nothing
        last = s.scalar(
            select(func.max(LabelHistoryRow.revision)).where(
                LabelHistoryRow.round_id == round_id,
                LabelHistoryRow.image_id == image_id,
                LabelHistoryRow.rater_id == rater_id,
            )
        )
        # Numbers keep rising across undos, so a revision number is never reused.
        rev, now = (last or 0) + 1, utc_now()
        if row is None:
            row = LabelRow(round_id=round_id, image_id=image_id, rater_id=rater_id, created=now)
            s.add(row)
        for k, v in vals.items():
            setattr(row, k, v)
        row.revision, row.updated = rev, now
        s.add(
            LabelHistoryRow(
                round_id=round_id,
                image_id=image_id,
                rater_id=rater_id,
                revision=rev,
                time=now,
                **vals,
            )
        )
        s.flush()
        return label_record(row)

    def undo(self, round_id: int, image_id: str, rater_id: int) -> Label | None:
        """Step a label back to its previous revision; returns it, or None when none is left."""

        def work(s: Session) -> Label | None:
            row = self._label_row(s, round_id, image_id, rater_id)
            if row is None:
                self._image(s, round_id, image_id)  # a clearer error for a wrong image id
                raise FeedbackError(
                    f"rater {rater_id} has no label for image {image_id!r} in "
                    f"round {round_id}: nothing to undo"
                )
            live = s.scalars(
                select(LabelHistoryRow)
                .where(
                    LabelHistoryRow.round_id == round_id,
                    LabelHistoryRow.image_id == image_id,
                    LabelHistoryRow.rater_id == rater_id,
                    LabelHistoryRow.undone.is_(False),
                )
                .order_by(LabelHistoryRow.revision.desc())
                .limit(2)
            ).all()
            if live:
                live[0].undone = True
            if len(live) < 2:
                s.delete(row)
                return None
            prev = live[1]
            for k in (*LABEL_VALUES, "revision"):
                setattr(row, k, getattr(prev, k))
            row.updated = utc_now()
            s.flush()
            return label_record(row)

        return self._write(work)

    def history(self, round_id: int, image_id: str, rater_id: int) -> list[Revision]:
        """Every revision of a label, oldest first; undone ones are marked."""
        with self._read() as s:
            rows = s.scalars(
                select(LabelHistoryRow)
                .where(
                    LabelHistoryRow.round_id == round_id,
                    LabelHistoryRow.image_id == image_id,
                    LabelHistoryRow.rater_id == rater_id,
                )
                .order_by(LabelHistoryRow.revision)
            ).all()
            return [
                Revision(
                    r.revision,
                    r.plausible,
                    tuple(r.failed_criteria or ()),
                    r.subtype,
                    r.comment or "",
                    r.source,
                    as_utc(r.time),
                    r.undone,
                    r.answer,
                )
                for r in rows
            ]

    def labels(self, round_id: int, rater_id: int | None = None) -> list[Label]:
        """Current labels of a round (optionally one rater's), in image order then rater id."""
        with self._read() as s:
            self._round(s, round_id)
            q = (
                select(LabelRow)
                .join(
                    ImageRow,
                    (ImageRow.round_id == LabelRow.round_id)
                    & (ImageRow.image_id == LabelRow.image_id),
                )
                .where(LabelRow.round_id == round_id)
                .order_by(ImageRow.position, LabelRow.rater_id)
            )
            if rater_id is not None:
                q = q.where(LabelRow.rater_id == rater_id)
            return [label_record(r) for r in s.scalars(q)]

    # ------------------------------------------------------------------ review queue

    def _scored_ids(self, round_id: int, rater_id: int) -> set[str]:
        return {lab.image_id for lab in self.labels(round_id, rater_id) if lab.state == "done"}

    def progress(self, round_id: int, rater_id: int) -> tuple[int, int, str | None]:
        """(scored by this rater, images in round, first unscored image id in order or None).

        An unscored label (plausible None) or a skipped one does not count as done: the image
        comes back. An answer (unsure, or a blinded/pairwise round's) does.
        """
        images = self.images(round_id)
        done = self._scored_ids(round_id, rater_id)
        nxt = next((im.image_id for im in images if im.image_id not in done), None)
        return len(done & {im.image_id for im in images}), len(images), nxt

    def next_images(
        self,
        round_id: int,
        rater_id: int,
        order: str = "random",
        k: int = 1,
        scores: dict[str, float] | None = None,
        seed: int = 0,
    ) -> list[str]:
        """Up to ``k`` image ids this rater has not scored yet.

        ``random``: a fixed permutation of the round by ``seed``, so the queue is stable while
        the rater works through it. ``active``: images whose reward score (probability of
        plausible, from the caller) is closest to 0.5 first, i.e. where the reward model is least
        sure; images without a score come last. ``sequential``: shard order.
        """
        check_choice("order", order, ORDERS)
        if order == "active" and scores is None:
            raise FeedbackError("order='active' needs scores: {image_id: P(plausible)}")
        done = self._scored_ids(round_id, rater_id)
        ids = [im.image_id for im in self.images(round_id)]
        if order == "random":
            random.Random(seed).shuffle(ids)
        elif order == "active":
            rank = {i: abs(float(scores[i]) - 0.5) if i in scores else math.inf for i in ids}
            ids.sort(key=lambda i: rank[i])  # stable: ties stay in shard order
        return [i for i in ids if i not in done][: max(int(k), 0)]

    # ------------------------------------------------------------------ aggregation

    def _scored(self, round_id: int, sources: Sequence[str] | None) -> list[Label]:
        if sources is not None:
            for src in sources:
                check_choice("source", src, SOURCES)
        return [
            lab
            for lab in self.labels(round_id)
            if lab.plausible is not None and (sources is None or lab.source in sources)
        ]

    def agreement(self, round_id: int, sources: Sequence[str] | None = None) -> dict:
        """Inter-rater agreement on plausible, overall and per class (see ``agreement_of``)."""
        class_of = {im.image_id: im.class_name for im in self.images(round_id)}
        ratings: dict[str, dict[int, bool]] = defaultdict(dict)
        for lab in self._scored(round_id, sources):
            ratings[lab.image_id][lab.rater_id] = bool(lab.plausible)
        per_class: dict[str, dict] = defaultdict(dict)
        for image_id, votes in ratings.items():
            per_class[class_of[image_id]][image_id] = votes
        names = [c.name for c in self.vocabulary(round_id).classes]
        return {
            "overall": agreement_of(ratings),
            "per_class": {n: agreement_of(per_class[n]) for n in names if n in per_class},
        }

    def round_stats(self, round_id: int) -> dict:
        """Per class, per rater, answers, agreement, and the mode's own statistics (e.g. the
        blinded test's accuracy); see ``pathloop.review_stats``."""
        from pathloop.review_stats import round_stats

        return round_stats(self, round_id)

    # ------------------------------------------------------------------ export

    def shard_table(self, round_id: int, columns: list[str] | None = None) -> Any:
        """The round's rows of its shard set as a pyarrow Table, in review order."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from pathloop.data import read_manifest

        info = self.round_info(round_id)
        if info.mode == "pairwise":
            raise FeedbackError(
                f"round {round_id} is pairwise: its items are pairs of images, not shard rows; "
                "`pathloop review pairs` writes its preference pairs"
            )
        d = Path(info.samples_dir)
        files = [d / s["file"] for s in read_manifest(d)["shards"]]
        images = self.images(round_id)
        want = [im.image_id for im in images]
        parts = [pq.read_table(f, columns=columns) for f in files]
        table = pa.concat_tables(parts) if parts else None
        if table is None:
            raise FeedbackError(f"round {round_id}: shard set {d} holds no shards")
        table = table.filter(pc.is_in(table["id"], value_set=pa.array(want)))
        index = {v: i for i, v in enumerate(table["id"].to_pylist())}
        missing = [i for i in want if i not in index]
        if missing:
            raise FeedbackError(
                f"round {round_id}: {len(missing)} images are gone from {d}, "
                f"e.g. {some_of(missing, 3)}"
            )
        return table.take(pa.array([index[i] for i in want], type=pa.int64()))

    def export_round(
        self,
        round_id: int,
        out_dir: str | Path,
        how: str = "majority",
        min_raters: int = 1,
        sources: Sequence[str] | None = None,
    ) -> Path:
        """Write ``feedback.parquet`` (images + aggregated labels) and ``agreement.json``.

        Rows: the round's images with at least ``min_raters`` scored labels (from ``sources``,
        default all), in review order, with the shard columns (the shard's own ``subtype``
        renamed ``shard_subtype``) and ``plausible``, ``plausible_soft``, ``n_raters``,
        ``subtype`` and ``fail_<criterion>`` as in ``aggregate_labels``. Returns the Parquet path.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        check_choice("aggregation", how, AGGREGATIONS)
        by_image: dict[str, list[Label]] = defaultdict(list)
        for lab in self._scored(round_id, sources):
            by_image[lab.image_id].append(lab)
        table = self.shard_table(round_id)
        keep = [
            i
            for i, rid in enumerate(table["id"].to_pylist())
            if len(by_image[rid]) >= max(min_raters, 1)
        ]
        table = table.take(pa.array(keep, type=pa.int64()))
        table = table.rename_columns(
            ["shard_subtype" if n == "subtype" else n for n in table.column_names]
        )
        agg = [aggregate_labels(by_image[rid], how) for rid in table["id"].to_pylist()]
        for key, typ in _agg_columns():
            table = table.append_column(pa.field(key, typ), pa.array([a[key] for a in agg], typ))
        meta = {
            "pathloop.round_id": str(round_id),
            "pathloop.how": how,
            "pathloop.min_raters": str(min_raters),
            "pathloop.vocabulary": self.vocabulary(round_id).model_dump_json(),
        }
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / FEEDBACK_FILE)
        agreement = {
            "round_id": round_id,
            "sources": list(sources) if sources else None,
            **self.agreement(round_id, sources),
        }
        (out / AGREEMENT_FILE).write_text(json.dumps(agreement, indent=2) + "\n")
        log.info(
            "round %d: exported %d of %d images to %s", round_id, len(keep), len(by_image), out
        )
        return out / FEEDBACK_FILE

    def current_label(self, round_id: int, image_id: str, rater_id: int) -> Label | None:
        """The current label of one rater on one image, or None."""
        with self._read() as s:
            row = self._label_row(s, round_id, image_id, rater_id)
            return None if row is None else label_record(row)


def _agg_columns() -> tuple[tuple[str, Any], ...]:
    import pyarrow as pa

    cols = [
        ("plausible", pa.float64()),
        ("plausible_soft", pa.float64()),
        ("n_raters", pa.int32()),
        ("subtype", pa.string()),
    ]
    return tuple(cols + [(f"fail_{c}", pa.float64()) for c in CRITERIA])
