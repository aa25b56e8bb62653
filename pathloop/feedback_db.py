"""The feedback store's database: ORM tables, the records the store returns, the engine.

Tables (SQLAlchemy 2 ORM; SQLite file by default, PostgreSQL by URL):

- ``rounds``: id, name, samples_dir, created, vocabulary (JSON), status (open/closed)
- ``images``: round_id, image_id (the shard ``id``), class_id, class_name, position
- ``raters``: id, name, token_hash (sha256 of the bearer token; never the token), kind, created
- ``labels``: the current label per (round, image, rater): plausible (None = unscored),
  failed_criteria (JSON list), subtype, comment, source, created, updated, revision
- ``label_history``: every revision's values and time; ``undone`` marks revisions undo removed

SQLite runs in WAL mode with a busy timeout, and writes take the lock up front
(``BEGIN IMMEDIATE``), so several threads and processes can label at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
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
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pathloop.vocab import CRITERIA, ClassInfo

RATER_KINDS: tuple[str, ...] = ("human", "mllm", "judge")


SOURCES: tuple[str, ...] = ("human", "mllm", "judge")


ROUND_STATUSES: tuple[str, ...] = ("open", "closed")


AGGREGATIONS: tuple[str, ...] = ("majority", "mean")


ORDERS: tuple[str, ...] = ("random", "active", "sequential")


BUSY_TIMEOUT_MS = 30_000  # SQLite waits this long for a lock before "database is locked"


WRITE_ATTEMPTS = 8  # retries of a whole write transaction on lock/race errors


_RETRYABLE = (
    "database is locked",
    "database table is locked",
    "busy",
    "deadlock detected",
    "could not serialize",
)


class FeedbackError(ValueError):
    """A request to the store was invalid; the message names the problem and the valid values."""


# ----------------------------------------------------------------------------- schema (ORM)


class Base(DeclarativeBase):
    pass


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class RoundRow(Base):
    __tablename__ = "rounds"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    samples_dir: Mapped[str] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
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
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


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
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
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
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    undone: Mapped[bool] = mapped_column(Boolean, default=False)


# ----------------------------------------------------------------------------- returned records


def as_utc(dt: datetime) -> datetime:
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


def rater_record(r: RaterRow) -> Rater:
    return Rater(id=r.id, name=r.name, kind=r.kind, created=as_utc(r.created))


def label_record(r: LabelRow) -> Label:
    return Label(
        round_id=r.round_id,
        image_id=r.image_id,
        rater_id=r.rater_id,
        plausible=r.plausible,
        failed_criteria=tuple(r.failed_criteria or ()),
        subtype=r.subtype,
        comment=r.comment or "",
        source=r.source,
        created=as_utc(r.created),
        updated=as_utc(r.updated),
        revision=r.revision,
    )


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


def is_retryable(err: Exception) -> bool:
    if isinstance(err, IntegrityError):
        return True  # a concurrent writer inserted the same key between our read and write
    text = str(getattr(err, "orig", err)).lower()
    return any(s in text for s in _RETRYABLE)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ----------------------------------------------------------------------------- validation


def some_of(values: Sequence[Any], n: int = 5) -> str:
    head = ", ".join(repr(v) for v in list(values)[:n])
    return head + (f", ... ({len(values)} in all)" if len(values) > n else "")


def check_choice(what: str, value: Any, valid: Sequence[Any]) -> None:
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


def check_plausible(value: Any) -> bool | None:
    if value is None or isinstance(value, bool | np.bool_):
        return None if value is None else bool(value)
    raise FeedbackError(f"plausible must be True, False or None (unscored), got {value!r}")
