"""The feedback store: rounds of images, raters, labels with history, aggregation and exports.

A *round* is one shard set of samples put up for review (``create_round``). Raters (people with a
bearer token, or machine evaluators) give each image at most one *current label* per rater; every
change is a new *revision* kept in ``label_history``, so ``undo`` can step back. ``export_round``
turns the labels into the Parquet table the reward model trains on, plus inter-rater agreement.

Tables (SQLAlchemy 2 ORM; SQLite file by default, PostgreSQL by URL):

- ``rounds``: id, name, samples_dir, created, vocabulary (JSON), status (open/closed)
- ``images``: round_id, image_id (the shard ``id``), class_id, class_name, position
- ``raters``: id, name, token_hash (sha256 of the bearer token; never the token), kind, created
- ``labels``: the current label per (round, image, rater): plausible (None = unscored),
  failed_criteria (JSON list), subtype, comment, source, created, updated, revision
- ``label_history``: every revision's values and time; ``undone`` marks revisions undo removed

Every write is one transaction; SQLite runs in WAL mode with a busy timeout, writes take the lock
up front (``BEGIN IMMEDIATE``) and "database is locked" is retried, so several threads and
processes can label at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from pathloop.vocab import CRITERIA, CRITERIA_TEXT, ClassInfo, Vocabulary

log = logging.getLogger(__name__)

RATER_KINDS: tuple[str, ...] = ("human", "mllm", "judge")
SOURCES: tuple[str, ...] = ("human", "mllm", "judge")
ROUND_STATUSES: tuple[str, ...] = ("open", "closed")
AGGREGATIONS: tuple[str, ...] = ("majority", "mean")
ORDERS: tuple[str, ...] = ("random", "active", "sequential")

FEEDBACK_FILE = "feedback.parquet"
AGREEMENT_FILE = "agreement.json"
BUSY_TIMEOUT_MS = 30_000  # SQLite waits this long for a lock before "database is locked"
WRITE_ATTEMPTS = 8  # retries of a whole write transaction on lock/race errors
_RETRYABLE = (
    "database is locked",
    "database table is locked",
    "busy",
    "deadlock detected",
    "could not serialize",
)

T = TypeVar("T")


class FeedbackError(ValueError):
    """A request to the store was invalid; the message names the problem and the valid values."""


# ----------------------------------------------------------------------------- schema (ORM)


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


class RoundRow(Base):
    __tablename__ = "rounds"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    samples_dir: Mapped[str] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    vocabulary: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="open")


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("round_id", "image_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    image_id: Mapped[str] = mapped_column(String(64))
    class_id: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer)  # order in the shard set: review order


class RaterRow(Base):
    __tablename__ = "raters"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # sha256 hex of the bearer token; None for raters that never log in (machines, imports).
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


_IMAGE_FK = ForeignKeyConstraint(
    ["round_id", "image_id"], ["images.round_id", "images.image_id"], ondelete="CASCADE"
)


class LabelRow(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("round_id", "image_id", "rater_id"), _IMAGE_FK)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(Integer)
    image_id: Mapped[str] = mapped_column(String(64))
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id"))
    plausible: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    failed_criteria: Mapped[list] = mapped_column(JSON, default=list)
    subtype: Mapped[str | None] = mapped_column(String(100), nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revision: Mapped[int] = mapped_column(Integer)


class LabelHistoryRow(Base):
    __tablename__ = "label_history"
    __table_args__ = (
        Index("ix_label_history_key", "round_id", "image_id", "rater_id"),
        ForeignKeyConstraint(
            ["round_id", "image_id"], ["images.round_id", "images.image_id"], ondelete="CASCADE"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(Integer)
    image_id: Mapped[str] = mapped_column(String(64))
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id"))
    revision: Mapped[int] = mapped_column(Integer)
    plausible: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    failed_criteria: Mapped[list] = mapped_column(JSON, default=list)
    subtype: Mapped[str | None] = mapped_column(String(100), nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(16))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    undone: Mapped[bool] = mapped_column(Boolean, default=False)


# ----------------------------------------------------------------------------- returned records


def _utc(dt: datetime) -> datetime:
    """SQLite drops the zone on the way back; every time stored here is UTC."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Rater:
    id: int
    name: str
    kind: str
    created: datetime


@dataclass(frozen=True)
class RoundInfo:
    id: int
    name: str
    samples_dir: str
    created: datetime
    status: str
    n_images: int


@dataclass(frozen=True)
class RoundImage:
    image_id: str
    class_id: int
    class_name: str
    position: int


@dataclass(frozen=True)
class Label:
    """The current label of one image by one rater."""

    round_id: int
    image_id: str
    rater_id: int
    plausible: bool | None  # None = unscored (e.g. the MLLM gave no usable reply)
    failed_criteria: tuple[str, ...]  # in CRITERIA order
    subtype: str | None
    comment: str
    source: str
    created: datetime
    updated: datetime
    revision: int


@dataclass(frozen=True)
class Revision:
    """One entry of a label's history."""

    revision: int
    plausible: bool | None
    failed_criteria: tuple[str, ...]
    subtype: str | None
    comment: str
    source: str
    time: datetime
    undone: bool


def _rater(r: RaterRow) -> Rater:
    return Rater(id=r.id, name=r.name, kind=r.kind, created=_utc(r.created))


def _label(r: LabelRow) -> Label:
    return Label(
        round_id=r.round_id,
        image_id=r.image_id,
        rater_id=r.rater_id,
        plausible=r.plausible,
        failed_criteria=tuple(r.failed_criteria or ()),
        subtype=r.subtype,
        comment=r.comment or "",
        source=r.source,
        created=_utc(r.created),
        updated=_utc(r.updated),
        revision=r.revision,
    )


class BadItem(BaseModel):
    """One Label Studio annotation that was not stored, and why."""

    task: int | str | None = Field(description="Label Studio task id (or index in the file).")
    image_id: str | None = Field(description="The task's data.image_id, if present.")
    annotator: str | None = Field(description="Rater name the annotation would have used.")
    reason: str = Field(description="Why it was not stored.")


class ImportReport(BaseModel):
    """What ``labelstudio_import`` did."""

    n_tasks: int = Field(description="Tasks in the export file.")
    n_annotations: int = Field(description="Annotations seen (cancelled ones included).")
    n_stored: int = Field(description="Annotations stored as a new label revision.")
    n_unchanged: int = Field(description="Annotations identical to the stored label.")
    raters: list[str] = Field(description="Rater names the annotations were stored under.")
    bad: list[BadItem] = Field(description="Annotations not stored, with reasons.")


# ----------------------------------------------------------------------------- engine


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def normalise_url(url: str | Path) -> str:
    """A database URL; a plain path means a SQLite file there (``sqlite:////abs/path.db``)."""
    text = str(url)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # We emit BEGIN ourselves (see _sqlite_on_begin), so the driver must not.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a commit costs no fsync
    cur.close()


def _sqlite_on_begin(conn: Any) -> None:
    # Writes take the write lock at BEGIN: a deferred transaction that reads then writes can fail
    # on the upgrade with SQLITE_BUSY at once, without waiting for the busy timeout.
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str | Path) -> Engine:
    """An engine for ``url`` (SQLite in WAL mode with a busy timeout, or any SQLAlchemy URL)."""
    url = normalise_url(url)
    if not _is_sqlite(url):
        return create_engine(url, pool_pre_ping=True)
    from sqlalchemy.pool import StaticPool

    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if url in ("sqlite://", "sqlite:///:memory:"):
        kwargs["poolclass"] = StaticPool  # one shared connection, or each thread gets its own DB
    else:
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _retryable(err: Exception) -> bool:
    if isinstance(err, IntegrityError):
        return True  # a concurrent writer inserted the same key between our read and write
    text = str(getattr(err, "orig", err)).lower()
    return any(s in text for s in _RETRYABLE)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ----------------------------------------------------------------------------- validation


def _some(values: Sequence[Any], n: int = 5) -> str:
    head = ", ".join(repr(v) for v in list(values)[:n])
    return head + (f", ... ({len(values)} in all)" if len(values) > n else "")


def _check_choice(what: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise FeedbackError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


def check_criteria(failed: Iterable[str]) -> tuple[str, ...]:
    """Failed criteria deduplicated in CRITERIA order; an unknown one lists the valid ones."""
    if isinstance(failed, str):
        failed = [failed]  # a single name, not its characters
    failed = list(failed)
    unknown = [c for c in failed if c not in CRITERIA]
    if unknown:
        raise FeedbackError(f"unknown criteria {unknown}; valid criteria: {', '.join(CRITERIA)}")
    return tuple(c for c in CRITERIA if c in failed)


def check_subtype(info: ClassInfo, subtype: str | None) -> str | None:
    """``subtype`` if the class allows it; classes without subtypes accept only None."""
    if subtype in (None, ""):
        return None
    if not info.subtypes:
        raise FeedbackError(f"class {info.name!r} has no subtypes; got subtype {subtype!r}")
    if subtype not in info.subtypes:
        raise FeedbackError(
            f"subtype {subtype!r} not allowed for class {info.name!r}; "
            f"valid subtypes: {', '.join(info.subtypes)}"
        )
    return subtype


def _check_plausible(value: Any) -> bool | None:
    if value is None or isinstance(value, bool | np.bool_):
        return None if value is None else bool(value)
    raise FeedbackError(f"plausible must be True, False or None (unscored), got {value!r}")


# ----------------------------------------------------------------------------- agreement


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa of two raters over the same items: (p_o - p_e) / (1 - p_e).

    Degenerate case: when both raters used one and the same label for every item, p_e = 1 and
    the ratio is 0/0; that is perfect agreement, so it returns 1.0. No items gives NaN.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"raters rated different numbers of items: {a.shape} vs {b.shape}")
    if a.size == 0:
        return float("nan")
    p_o = float(np.mean(a == b))
    p_e = float(sum(np.mean(a == c) * np.mean(b == c) for c in np.union1d(a, b)))
    if math.isclose(p_e, 1.0):
        return 1.0
    return (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from an (items, categories) table of how many raters chose each category.

    Items may have different numbers of ratings (each needs at least 2): P_i uses the item's own
    n_i, which reduces to Fleiss (1971) when every n_i is the same. When every rating falls in one
    category P_e = 1 and the ratio is 0/0; that is perfect agreement, so it returns 1.0. No items
    gives NaN.
    """
    counts = np.asarray(counts, dtype=np.float64)  # (N, k)
    if counts.ndim != 2:
        raise ValueError(f"counts must be (items, categories), got shape {counts.shape}")
    n_i = counts.sum(axis=1)  # (N,) ratings per item
    if counts.shape[0] == 0:
        return float("nan")
    if np.any(n_i < 2):
        raise ValueError("every item needs at least 2 ratings for Fleiss' kappa")
    p_j = counts.sum(axis=0) / counts.sum()  # (k,) share of all ratings in each category
    p_i = ((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))  # (N,) agreeing rater pairs
    p_bar, p_e = float(p_i.mean()), float((p_j**2).sum())
    if math.isclose(p_e, 1.0):
        return 1.0
    return (p_bar - p_e) / (1.0 - p_e)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def agreement_of(ratings: dict[str, dict[int, bool]]) -> dict:
    """Agreement on ``plausible`` of {image_id: {rater_id: plausible}}.

    Two raters: Cohen's kappa over the images both rated. More: Fleiss' kappa over the images
    with at least two ratings. Fewer than two raters or no shared images: kappa None.
    """
    raters = sorted({r for votes in ratings.values() for r in votes})
    out: dict[str, Any] = {
        "method": None,
        "kappa": None,
        "n_items": 0,
        "n_raters": len(raters),
        "observed_agreement": None,
    }
    if len(raters) < 2:
        return out
    if len(raters) == 2:
        pairs = [(v[raters[0]], v[raters[1]]) for v in ratings.values() if len(v) == 2]
        a = np.array([p[0] for p in pairs], dtype=bool)
        b = np.array([p[1] for p in pairs], dtype=bool)
        out.update(method="cohen", kappa=_nan_to_none(cohen_kappa(a, b)), n_items=len(pairs))
        out["observed_agreement"] = float(np.mean(a == b)) if pairs else None
        return out
    rows = [
        [sum(not x for x in v.values()), sum(v.values())] for v in ratings.values() if len(v) >= 2
    ]
    counts = np.array(rows, dtype=np.float64).reshape(-1, 2)  # (N, 2): implausible, plausible
    out.update(method="fleiss", kappa=_nan_to_none(fleiss_kappa(counts)), n_items=len(rows))
    if rows:
        n_i = counts.sum(axis=1)
        out["observed_agreement"] = float(
            (((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))).mean()
        )
    return out


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
    _check_choice("aggregation", how, AGGREGATIONS)
    votes = [lab for lab in labels if lab.plausible is not None]
    n = len(votes)
    soft = float(np.mean([lab.plausible for lab in votes])) if n else float("nan")
    hard = soft if how == "mean" or not n else float(soft > 0.5)  # majority: a tie is 0.0
    row: dict[str, Any] = {"plausible": hard, "plausible_soft": soft, "n_raters": n}
    row["subtype"] = _majority(lab.subtype for lab in votes if lab.subtype)
    for c in CRITERIA:
        row[f"fail_{c}"] = (sum(c in lab.failed_criteria for lab in votes) / n) if n else 0.0
    return row


# ----------------------------------------------------------------------------- Label Studio


def labeling_config(vocab: Vocabulary) -> str:
    """Label Studio labeling config: plausible or not, failed criteria, subtype, comment."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name="image", value="$image", zoom="true")
    ET.SubElement(view, "Header", value="$class_name")
    ET.SubElement(view, "Text", name="description", value="$description")
    verdict = ET.SubElement(
        view,
        "Choices",
        name="plausible",
        toName="image",
        choice="single",
        required="true",
        showInline="true",
    )
    for v in ("plausible", "implausible"):
        ET.SubElement(verdict, "Choice", value=v)
    crit = ET.SubElement(view, "Choices", name="failed_criteria", toName="image", choice="multiple")
    for c in CRITERIA:  # alias: the result stores the criterion key, the UI shows the text
        ET.SubElement(crit, "Choice", value=CRITERIA_TEXT[c], alias=c)
    subtypes = sorted({s for c in vocab.classes for s in c.subtypes})
    if subtypes:
        sub = ET.SubElement(view, "Choices", name="subtype", toName="image", choice="single")
        for s in subtypes:
            ET.SubElement(sub, "Choice", value=s)
    ET.SubElement(
        view,
        "TextArea",
        name="comment",
        toName="image",
        editable="true",
        maxSubmissions="1",
        placeholder="Comment (optional)",
    )
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


_CRITERION_BY_TEXT = {**{v: k for k, v in CRITERIA_TEXT.items()}, **{c: c for c in CRITERIA}}
_LS_CONTROLS = ("plausible", "failed_criteria", "subtype", "comment")


def _annotator_name(annotation: dict, prefix: str) -> str | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return None if who in (None, "") else f"{prefix}{who}"


def parse_ls_result(result: list) -> dict:
    """put_label keywords from one Label Studio annotation's ``result`` list."""
    out: dict[str, Any] = {"failed_criteria": [], "subtype": None, "comment": ""}
    for item in result or []:
        name, value = item.get("from_name"), item.get("value") or {}
        if name not in _LS_CONTROLS:
            raise FeedbackError(f"unknown control {name!r}; valid: {', '.join(_LS_CONTROLS)}")
        if name == "comment":
            out["comment"] = "\n".join(value.get("text") or [])
            continue
        choices = value.get("choices") or []
        if name == "plausible":
            if len(choices) != 1 or choices[0] not in ("plausible", "implausible"):
                raise FeedbackError(
                    f"plausible choice must be 'plausible' or 'implausible', got {choices}"
                )
            out["plausible"] = choices[0] == "plausible"
        elif name == "failed_criteria":
            bad = [c for c in choices if c not in _CRITERION_BY_TEXT]
            if bad:
                raise FeedbackError(f"unknown criteria {bad}; valid: {', '.join(CRITERIA)}")
            out["failed_criteria"] = [_CRITERION_BY_TEXT[c] for c in choices]
        else:
            out["subtype"] = choices[0] if choices else None
    if "plausible" not in out:
        raise FeedbackError("annotation has no 'plausible' choice")
    return out


# ----------------------------------------------------------------------------- the store


class FeedbackStore:
    """Rounds, raters and labels in one database; see the module docstring for the schema."""

    def __init__(self, url: str | Path) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(
            self.engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False
        )
        self._vocabs: dict[int, Vocabulary] = {}
        # Several processes may open a new database at once; CREATE TABLE races are retried.
        self._retry(lambda: Base.metadata.create_all(self.engine))

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
                if attempt == WRITE_ATTEMPTS - 1 or not _retryable(err):
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

    def create_round(self, samples_dir: str | Path, name: str | None = None) -> int:
        """Open a round on a shard set: every image in it, in shard order, awaits labels."""
        from pathloop.data import iter_records, read_manifest

        d = Path(samples_dir).resolve()
        manifest = read_manifest(d)
        vocab = Vocabulary.model_validate({"classes": manifest["classes"]})
        rows = [
            {
                "image_id": r["id"],
                "class_id": r["class_id"],
                "class_name": r["class_name"],
                "position": i,
            }
            for i, r in enumerate(iter_records(d, columns=["id", "class_id", "class_name"]))
        ]

        def work(s: Session) -> int:
            rnd = RoundRow(
                name=name or d.name,
                samples_dir=str(d),
                status="open",
                vocabulary=vocab.model_dump(mode="json"),
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
            raise FeedbackError(f"unknown round {round_id!r}; existing rounds: {_some(ids)}")
        return rnd

    def round_info(self, round_id: int) -> RoundInfo:
        with self._read() as s:
            r = self._round(s, round_id)
            n = s.scalar(select(func.count()).where(ImageRow.round_id == round_id)) or 0
            return RoundInfo(
                id=r.id,
                name=r.name,
                samples_dir=r.samples_dir,
                created=_utc(r.created),
                status=r.status,
                n_images=n,
            )

    def rounds(self) -> list[RoundInfo]:
        with self._read() as s:
            ids = s.scalars(select(RoundRow.id).order_by(RoundRow.id)).all()
        return [self.round_info(i) for i in ids]

    def set_status(self, round_id: int, status: str) -> None:
        """Open or close a round; a closed round takes no new labels."""
        _check_choice("round status", status, ROUND_STATUSES)

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
            return [RoundImage(r.image_id, r.class_id, r.class_name, r.position) for r in rows]

    # ------------------------------------------------------------------ raters

    def add_rater(self, name: str, kind: str = "human") -> tuple[int, str]:
        """Register a rater; returns (rater_id, bearer token). The token is shown only here."""
        _check_choice("rater kind", kind, RATER_KINDS)
        if not name.strip():
            raise FeedbackError("rater name must not be empty")
        token = secrets.token_urlsafe(32)

        def work(s: Session) -> int:
            if s.scalar(select(RaterRow.id).where(RaterRow.name == name)) is not None:
                raise FeedbackError(f"rater {name!r} exists; pick another name or issue_token()")
            row = RaterRow(name=name, kind=kind, token_hash=_hash_token(token))
            s.add(row)
            s.flush()
            return row.id

        return self._write(work), token

    def issue_token(self, rater_id: int) -> str:
        """A new bearer token for a rater (the old one stops working)."""
        token = secrets.token_urlsafe(32)

        def work(s: Session) -> None:
            self._rater(s, rater_id).token_hash = _hash_token(token)

        self._write(work)
        return token

    def ensure_rater(self, name: str, kind: str = "human") -> int:
        """The id of rater ``name``, created without a token if new (machines, imports)."""
        _check_choice("rater kind", kind, RATER_KINDS)

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
        """The rater holding ``token``, or None."""
        if not token:
            return None
        digest = _hash_token(token)
        with self._read() as s:
            row = s.scalar(select(RaterRow).where(RaterRow.token_hash == digest))
        # The lookup compares hashes of the secret, which leak nothing useful through timing;
        # compare_digest keeps the final check constant-time anyway.
        if row is None or not hmac.compare_digest(row.token_hash or "", digest):
            return None
        return _rater(row)

    def raters(self) -> list[Rater]:
        with self._read() as s:
            return [_rater(r) for r in s.scalars(select(RaterRow).order_by(RaterRow.id))]

    def _rater(self, s: Session, rater_id: int) -> RaterRow:
        row = s.get(RaterRow, rater_id)
        if row is None:
            known = [
                f"{r.id} ({r.name})" for r in s.scalars(select(RaterRow).order_by(RaterRow.id))
            ]
            raise FeedbackError(f"unknown rater id {rater_id!r}; known raters: {_some(known)}")
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
                f"shard ids of its samples, e.g. {_some(ids, 3)})"
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
    ) -> Label:
        """Set a rater's label of an image (upsert); identical values add no revision.

        Raises FeedbackError, writing nothing, for an unknown round/image/rater/criterion/source,
        a subtype the class does not have, or a closed round.
        """
        values = {
            "plausible": _check_plausible(plausible),
            "failed_criteria": list(check_criteria(failed_criteria)),
            "comment": comment or "",
            "source": source,
        }
        _check_choice("source", source, SOURCES)
        vocab = self.vocabulary(round_id)

        def work(s: Session) -> Label:
            if self._round(s, round_id).status != "open":
                raise FeedbackError(f"round {round_id} is closed; reopen it to add labels")
            img = self._image(s, round_id, image_id)
            self._rater(s, rater_id)
            vals = {**values, "subtype": check_subtype(vocab.lookup(img.class_id), subtype)}
            return self._upsert(s, round_id, image_id, rater_id, vals)

        return self._write(work)

    def _upsert(self, s: Session, round_id: int, image_id: str, rater_id: int, vals: dict) -> Label:
        row = self._label_row(s, round_id, image_id, rater_id)
        if row is not None and all(getattr(row, k) == v for k, v in vals.items()):
            return _label(row)  # idempotent: a resent request changes nothing
        last = s.scalar(
            select(func.max(LabelHistoryRow.revision)).where(
                LabelHistoryRow.round_id == round_id,
                LabelHistoryRow.image_id == image_id,
                LabelHistoryRow.rater_id == rater_id,
            )
        )
        # Numbers keep rising across undos, so a revision number is never reused.
        rev, now = (last or 0) + 1, _now()
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
        return _label(row)

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
            for k in ("plausible", "failed_criteria", "subtype", "comment", "source", "revision"):
                setattr(row, k, getattr(prev, k))
            row.updated = _now()
            s.flush()
            return _label(row)

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
                    _utc(r.time),
                    r.undone,
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
            return [_label(r) for r in s.scalars(q)]

    # ------------------------------------------------------------------ review queue

    def _scored_ids(self, round_id: int, rater_id: int) -> set[str]:
        return {
            lab.image_id for lab in self.labels(round_id, rater_id) if lab.plausible is not None
        }

    def progress(self, round_id: int, rater_id: int) -> tuple[int, int, str | None]:
        """(scored by this rater, images in round, first unscored image id in order or None).

        An unscored label (plausible None) does not count as done: the image comes back.
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
        _check_choice("order", order, ORDERS)
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
                _check_choice("source", src, SOURCES)
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
        """Per class: images, labelled images, plausible rate; per rater: counts; agreement."""
        info, images = self.round_info(round_id), self.images(round_id)
        labels = self.labels(round_id)
        raters = {r.id: r for r in self.raters()}
        class_of = {im.image_id: im.class_name for im in images}
        classes = {
            c.name: {"n_images": 0, "n_labelled": 0, "plausible_rate": None}
            for c in self.vocabulary(round_id).classes
        }
        for im in images:
            classes[im.class_name]["n_images"] += 1
        by_class: dict[str, list[bool]] = defaultdict(list)
        labelled: dict[str, set[str]] = defaultdict(set)
        per_rater: dict[str, Counter] = defaultdict(Counter)
        for lab in labels:
            who = per_rater[raters[lab.rater_id].name]
            who["n_labels"] += 1
            if lab.plausible is not None:
                by_class[class_of[lab.image_id]].append(lab.plausible)
                labelled[class_of[lab.image_id]].add(lab.image_id)
                who["n_scored"] += 1
                who["n_plausible"] += int(lab.plausible)
        for name, votes in by_class.items():
            classes[name].update(
                n_labelled=len(labelled[name]), plausible_rate=float(np.mean(votes))
            )
        return {
            "round": {
                "id": info.id,
                "name": info.name,
                "status": info.status,
                "n_images": info.n_images,
                "n_labels": len(labels),
            },
            "classes": classes,
            "raters": {
                n: {
                    "kind": next(r.kind for r in raters.values() if r.name == n),
                    "n_labels": c["n_labels"],
                    "n_scored": c["n_scored"],
                    "n_plausible": c["n_plausible"],
                }
                for n, c in per_rater.items()
            },
            "agreement": self.agreement(round_id),
        }

    # ------------------------------------------------------------------ export

    def _shard_table(self, round_id: int, columns: list[str] | None = None) -> Any:
        """The round's rows of its shard set as a pyarrow Table, in review order."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from pathloop.data import read_manifest

        d = Path(self.round_info(round_id).samples_dir)
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
                f"e.g. {_some(missing, 3)}"
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

        _check_choice("aggregation", how, AGGREGATIONS)
        by_image: dict[str, list[Label]] = defaultdict(list)
        for lab in self._scored(round_id, sources):
            by_image[lab.image_id].append(lab)
        table = self._shard_table(round_id)
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

    # ------------------------------------------------------------------ Label Studio

    def labelstudio_export(
        self, round_id: int, out_dir: str | Path, image_url_prefix: str | None = None
    ) -> Path:
        """Write Label Studio ``tasks.json`` and ``labeling_config.xml``; returns tasks.json.

        Images are inlined as PNG data URIs, or, with ``image_url_prefix``, written to
        ``out_dir/images/<id>.png`` and referenced as ``<prefix>/<id>.png`` (serve that folder).
        """
        vocab = self.vocabulary(round_id)
        table = self._shard_table(round_id, columns=["id", "image", "class_id"])
        out = Path(out_dir)
        (out / "images" if image_url_prefix else out).mkdir(parents=True, exist_ok=True)
        tasks = []
        for rid, png, cid in zip(
            table["id"].to_pylist(),
            table["image"].to_pylist(),
            table["class_id"].to_pylist(),
            strict=True,
        ):
            info = vocab.lookup(int(cid))
            if image_url_prefix:
                (out / "images" / f"{rid}.png").write_bytes(png)
                url = f"{image_url_prefix.rstrip('/')}/{rid}.png"
            else:
                url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
            tasks.append(
                {
                    "data": {
                        "image": url,
                        "image_id": rid,
                        "round_id": round_id,
                        "class_name": info.name,
                        "class_code": info.code,
                        "description": info.description,
                    }
                }
            )
        (out / "tasks.json").write_text(json.dumps(tasks, indent=1) + "\n")
        (out / "labeling_config.xml").write_text(labeling_config(vocab))
        return out / "tasks.json"

    def labelstudio_import(
        self, round_id: int, export_json_path: str | Path, rater_name_prefix: str = "ls:"
    ) -> ImportReport:
        """Store the annotations of a Label Studio JSON export as human labels.

        One rater per annotator (``<prefix><email or id>``). Bad annotations are listed in the
        report with the reason; every good one is stored (one transaction each).
        """
        try:
            tasks = json.loads(Path(export_json_path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FeedbackError(
                f"cannot read Label Studio export {export_json_path}: {err}"
            ) from None
        if not isinstance(tasks, list):
            raise FeedbackError("a Label Studio JSON export is a list of tasks")
        report = ImportReport(
            n_tasks=len(tasks), n_annotations=0, n_stored=0, n_unchanged=0, raters=[], bad=[]
        )
        for index, task in enumerate(tasks):
            self._import_task(round_id, task, index, rater_name_prefix, report)
        return report

    def _import_task(
        self, round_id: int, task: Any, index: int, prefix: str, report: ImportReport
    ) -> None:
        task = task if isinstance(task, dict) else {}
        task_id = task.get("id", index)
        image_id = (task.get("data") or {}).get("image_id")
        for ann in task.get("annotations") or []:
            report.n_annotations += 1
            who = _annotator_name(ann, prefix)
            try:
                if who is None:
                    raise FeedbackError("annotation has no completed_by")
                if not image_id:
                    raise FeedbackError("task has no data.image_id")
                if ann.get("was_cancelled"):
                    raise FeedbackError("annotation was cancelled (skipped)")
                kw = parse_ls_result(ann.get("result"))
                rater_id = self.ensure_rater(who, "human")
                before = self._label_row_snapshot(round_id, image_id, rater_id)
                lab = self.put_label(round_id, image_id, rater_id, source="human", **kw)
            except FeedbackError as err:
                report.bad.append(
                    BadItem(task=task_id, image_id=image_id, annotator=who, reason=str(err))
                )
                continue
            if who not in report.raters:
                report.raters.append(who)
            changed = before is None or before.revision != lab.revision
            report.n_stored += int(changed)
            report.n_unchanged += int(not changed)

    def _label_row_snapshot(self, round_id: int, image_id: str, rater_id: int) -> Label | None:
        with self._read() as s:
            row = self._label_row(s, round_id, image_id, rater_id)
            return None if row is None else _label(row)


def _agg_columns() -> tuple[tuple[str, Any], ...]:
    import pyarrow as pa

    cols = [
        ("plausible", pa.float64()),
        ("plausible_soft", pa.float64()),
        ("n_raters", pa.int32()),
        ("subtype", pa.string()),
    ]
    return tuple(cols + [(f"fail_{c}", pa.float64()) for c in CRITERIA])


# ----------------------------------------------------------------------------- preference pairs


def preference_pairs(
    scores: Sequence[float] | np.ndarray,
    class_ids: Sequence[int] | np.ndarray,
    bar: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """MAGIC's rule (Wang et al. 2025): pair images of the same class at random, then label them.

    Both scores below ``bar`` → both lose; a tie at or above the bar → both win; otherwise the
    higher score wins and the other loses. ``scores`` are checklist scores in [0, 1] (fraction of
    criteria passed, from the MLLM or the judge). Returns an int array (P, 4): index a, index b,
    sign a, sign b (+1 win, -1 lose), ready for ``losses.preference_loss``. An odd image out of a
    class is left unpaired.
    """
    s = np.asarray(scores, dtype=float)
    c = np.asarray(class_ids)
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, int, int, int]] = []
    for cls in np.unique(c):
        idx = rng.permutation(np.flatnonzero(c == cls))
        for a, b in zip(idx[0::2], idx[1::2], strict=False):
            if s[a] < bar and s[b] < bar:
                sa = sb = -1
            elif s[a] == s[b]:
                sa = sb = 1
            else:
                sa, sb = (1, -1) if s[a] > s[b] else (-1, 1)
            rows.append((int(a), int(b), sa, sb))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)
