"""The feedback store's database: ORM tables, the records the store returns, the engine.

Tables (SQLAlchemy 2 ORM; SQLite file by default, PostgreSQL by URL):

- ``rounds``: id, name, samples_dir, created, vocabulary (JSON), status (open/closed), mode
  (what raters answer: ROUND_MODES; None = plausibility), settings (JSON, e.g. require_criteria)
- ``images``: round_id, image_id (the shard ``id``; a pairwise round's item is ``<id a>|<id b>``),
  class_id, class_name, position, truth (blinded rounds: real or synthetic; never shown to raters)
- ``raters``: id, name, token_hash (sha256 of the bearer token; never the token), kind, created,
  token_created, token_expires, token_revoked (a token works until it expires or is revoked)
- ``labels``: the current label per (round, image, rater): plausible (None = unscored),
  failed_criteria (JSON list), subtype, comment, source, created, updated, revision, answer (an
  answer other than a verdict: unsure, skip, or the mode's own, ANSWERS; plausible is then None)
- ``label_history``: every revision's values and time; ``undone`` marks revisions undo removed

SQLite runs in WAL mode with a busy timeout, and writes take the lock up front
(``BEGIN IMMEDIATE``), so several threads and processes can label at once. A database made by an
older pathloop gets the columns it lacks when opened (``add_missing_columns``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
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
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pathloop.vocab import CRITERIA, ClassInfo

RATER_KINDS: tuple[str, ...] = ("human", "mllm", "judge")


SOURCES: tuple[str, ...] = ("human", "mllm", "judge")


ROUND_STATUSES: tuple[str, ...] = ("open", "closed")


AGGREGATIONS: tuple[str, ...] = ("majority", "mean")


ORDERS: tuple[str, ...] = ("random", "active", "sequential")


# What a rater may answer in each round mode besides a plausible/implausible verdict. "unsure" is
# final (the item is done, with no verdict); "skip" puts it back at the end of the rater's queue.
ANSWERS: dict[str, tuple[str, ...]] = {
    "plausibility": ("unsure", "skip"),
    "blinded": ("real", "synthetic", "unsure", "skip"),  # real-vs-synthetic test
    "pairwise": ("a", "b", "both", "neither", "unsure", "skip"),  # which is more plausible
}


ROUND_MODES: tuple[str, ...] = tuple(ANSWERS)


LABEL_VALUES = ("plausible", "failed_criteria", "subtype", "comment", "source", "answer")


BUSY_TIMEOUT_MS = 30_000  # SQLite waits this long for a lock before "database is locked"


WRITE_ATTEMPTS = 8  # retries of a whole write transaction on lock/race errors


TOKEN_DAYS = 30.0  # a rater token's default lifetime; `pathloop review rater --expires-days`


TOKEN_ID_HEX = 8  # a token's id: this many hex digits of its sha256 (never the token itself)


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
    mode: Mapped[str | None] = mapped_column(String(16), nullable=True)  # None: plausibility
    settings: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("round_id", "image_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    image_id: Mapped[str] = mapped_column(String(64))
    class_id: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer)  # order in the shard set: review order
    truth: Mapped[str | None] = mapped_column(String(16), nullable=True)  # blinded: real/synthetic


class RaterRow(Base):
    __tablename__ = "raters"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # sha256 hex of the bearer token; None for raters that never log in (machines, imports).
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    # The current token's issue time, end of life and revocation (None: not revoked).
    token_created: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    token_expires: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    token_revoked: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


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
    answer: Mapped[str | None] = mapped_column(String(16), nullable=True)  # see ANSWERS
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
    answer: Mapped[str | None] = mapped_column(String(16), nullable=True)
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
class TokenInfo:
    """A rater's sign-in token as listed: when it was issued, expires, was revoked; never the
    token, and ``token_id`` is only the first hex digits of its hash."""

    token_id: str
    rater_id: int
    rater: str
    kind: str
    created: datetime
    expires: datetime
    revoked: datetime | None

    def status(self, now: datetime) -> str:
        """active, expired or revoked at ``now``."""
        if self.revoked is not None:
            return "revoked"
        return "expired" if self.expires <= now else "active"


@dataclass(frozen=True)
class RoundInfo:
    id: int
    name: str
    samples_dir: str
    created: datetime
    status: str
    n_images: int
    mode: str = "plausibility"  # ROUND_MODES
    settings: dict | None = None  # e.g. {"require_criteria": true}


@dataclass(frozen=True)
class RoundImage:
    image_id: str
    class_id: int
    class_name: str
    position: int
    truth: str | None = None  # blinded rounds: real or synthetic (never sent to raters)


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
    answer: str | None = None  # unsure, skip or the mode's answer (ANSWERS); plausible is None

    @property
    def state(self) -> str | None:
        """done (a verdict or a final answer), skip (asked again at the end) or None (unscored:
        the item comes back)."""
        if self.answer == "skip":
            return "skip"
        return "done" if self.plausible is not None or self.answer is not None else None


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
    answer: str | None = None


def rater_record(r: RaterRow) -> Rater:
    return Rater(id=r.id, name=r.name, kind=r.kind, created=as_utc(r.created))


def token_record(r: RaterRow) -> TokenInfo:
    return TokenInfo(
        token_id=(r.token_hash or "")[:TOKEN_ID_HEX],
        rater_id=r.id,
        rater=r.name,
        kind=r.kind,
        created=as_utc(r.token_created or r.created),
        expires=as_utc(r.token_expires or r.created),  # none recorded: treated as expired
        revoked=as_utc(r.token_revoked) if r.token_revoked else None,
    )


def find_token(s: Session, who: str) -> RaterRow:
    """The rater row holding the token that ``who`` names: its rater's name or its token id."""
    rows = s.scalars(select(RaterRow).where(RaterRow.token_hash.is_not(None))).all()
    hits = [r for r in rows if r.name == who]
    hits = hits or [r for r in rows if r.token_hash[:TOKEN_ID_HEX] == who.strip().lower()]
    if len(hits) != 1:
        known = [f"{r.name} ({r.token_hash[:TOKEN_ID_HEX]})" for r in rows]
        problem = "names several tokens" if hits else "names no token"
        raise FeedbackError(f"{who!r} {problem}; tokens by rater (id): {some_of(known) or 'none'}")
    return hits[0]


def token_expiry(now: datetime, days: float) -> datetime:
    """When a token issued at ``now`` stops working; ``days`` must be positive."""
    if not (isinstance(days, int | float) and 0 < days <= 3650):
        raise FeedbackError(f"a token's lifetime must be in (0, 3650] days, got {days!r}")
    return now + timedelta(days=days)


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
        answer=r.answer,
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


def add_missing_columns(engine: Engine) -> list[str]:
    """Add the nullable columns this schema has and an older database's tables lack
    (``create_all`` makes missing tables, never missing columns); returns "table.column" added.
    Two processes may race to add one: the loser finds it there and moves on."""
    added = []
    for table in Base.metadata.sorted_tables:
        have = inspect(engine)
        if not have.has_table(table.name):
            continue
        present = {c["name"] for c in have.get_columns(table.name)}
        for col in table.columns:
            if col.name in present:
                continue
            if not col.nullable:
                raise RuntimeError(f"cannot add NOT NULL column {table.name}.{col.name} in place")
            kind = col.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {col.name} {kind}")
            except (OperationalError, ProgrammingError):
                cols = {c["name"] for c in inspect(engine).get_columns(table.name)}
                if col.name not in cols:
                    raise
                continue  # another process added it first
            added.append(f"{table.name}.{col.name}")
    return added


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


def check_answer(mode: str | None, plausible: bool | None, answer: str | None) -> None:
    """An answer valid in the round's mode, never with a verdict; blinded and pairwise rounds take
    answers only (their question is not plausible/implausible)."""
    mode = mode or "plausibility"
    if answer is not None:
        check_choice(f"answer in a {mode} round", answer, ANSWERS[mode])
        if plausible is not None:
            raise FeedbackError(f"send a verdict (plausible) or an answer ({answer!r}), not both")
    elif plausible is not None and mode != "plausibility":
        valid = ", ".join(ANSWERS[mode])
        raise FeedbackError(f"a {mode} round takes answers, not plausible: valid: {valid}")


def check_plausible(value: Any) -> bool | None:
    if value is None or isinstance(value, bool | np.bool_):
        return None if value is None else bool(value)
    raise FeedbackError(f"plausible must be True, False or None (unscored), got {value!r}")
