"""SQLAlchemy models. The schema is changed only by Alembic (migrations/); a new database is
created from these models at the newest revision (indexer/database.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A moment in time, written and read back in UTC on every database.

    SQLite keeps no zone: it stores the wall-clock digits it is given and returns them without one.
    PostgreSQL's `timestamptz` returns times in the session's zone (the server's local one, often).
    Unconverted, a backup from PostgreSQL into SQLite stored local digits that later read as UTC,
    shifting every time by the server's offset. Times are made UTC before they are written (a time
    without a zone is taken to be UTC) and come back as aware UTC datetimes from either database.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


# Image ids are 64-bit everywhere, as FAISS keys them. SQLite's INTEGER PRIMARY KEY is 64-bit
# already and is the rowid that numbers new rows, which a BIGINT column there would not be.
ImageId = BigInteger().with_variant(Integer, "sqlite")


class BackboneRow(Base):
    """The embedding model an index belongs to; every stored vector names one."""

    __tablename__ = "backbones"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Root(Base):
    """A folder the user asked to index; files missing from it on a later run are removed."""

    __tablename__ = "roots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ImageRow(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(ImageId, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    # The whole frame in 16 x 16 grey, 256 bytes: finds resized and re-encoded copies of a query
    # (indexer/near_duplicates.py). NULL for failures, and for images indexed before revision 0003
    # until the next index run fills it in.
    signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), index=True)  # "indexed" or "failed"
    error: Mapped[str | None] = mapped_column(Text)
    indexed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    embedding: Mapped[EmbeddingRow | None] = relationship(
        back_populates="image", cascade="all, delete-orphan", passive_deletes=True
    )


class EmbeddingRow(Base):
    """The durable copy of each vector: the FAISS index is rebuilt from these rows."""

    __tablename__ = "embeddings"

    image_id: Mapped[int] = mapped_column(ImageId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id"), index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian, unit length
    # Length of the backbone's features before normalisation: lets the built-in ImageNet
    # classifier (which acts on raw features) run on the stored unit vectors exactly.
    norm: Mapped[float | None] = mapped_column(Float)

    image: Mapped[ImageRow] = relationship(back_populates="embedding")


class HeadRow(Base):
    """A linear classification head trained on one backbone's embeddings."""

    __tablename__ = "heads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # binary | multiclass | multilabel
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id"))
    labels: Mapped[list] = mapped_column(JSON)  # binary: [negative, positive]
    weights: Mapped[bytes] = mapped_column(LargeBinary)  # .npz with weight (outputs x dim) and bias
    thresholds: Mapped[list] = mapped_column(JSON, default=list)
    min_confidence: Mapped[float] = mapped_column(Float, default=0.0)
    score_floor: Mapped[float] = mapped_column(Float, default=0.5)
    scale_by_norm: Mapped[bool] = mapped_column(Boolean, default=False)  # built-in ImageNet head
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    report_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The head_versions row these weights are a copy of; NULL for heads saved before revision 0005.
    version: Mapped[int | None] = mapped_column(Integer)


class HeadVersionRow(Base):
    """Every training of a head, kept so that an earlier one can be made current again."""

    __tablename__ = "head_versions"
    __table_args__ = (UniqueConstraint("head_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    head_id: Mapped[int] = mapped_column(ForeignKey("heads.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per head
    kind: Mapped[str] = mapped_column(String(16))
    labels: Mapped[list] = mapped_column(JSON)
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    thresholds: Mapped[list] = mapped_column(JSON)
    min_confidence: Mapped[float] = mapped_column(Float)
    score_floor: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ExampleSetRow(Base):
    """The examples a person labelled for a head (by name: they exist before its first training)."""

    __tablename__ = "example_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    positive: Mapped[str | None] = mapped_column(String(200))  # binary: the positive label
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ExampleRow(Base):
    """One labelled image of an example set; multi-label examples may carry no label (a negative)."""

    __tablename__ = "examples"

    set_id: Mapped[int] = mapped_column(ForeignKey("example_sets.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ImageId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    labels: Mapped[list] = mapped_column(JSON)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TagRow(Base):
    """One predicted label of one image by one head, with its score."""

    __tablename__ = "tags"
    # By head: a head's tags are deleted and counted together. (A label index went in revision
    # 0005: filters run on in-memory postings, and it cost every tag write a fourth b-tree.)
    __table_args__ = (Index("ix_tags_head_label", "head_id", "label"),)

    image_id: Mapped[int] = mapped_column(ImageId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    head_id: Mapped[int] = mapped_column(ForeignKey("heads.id", ondelete="CASCADE"), primary_key=True)
    label: Mapped[str] = mapped_column(String(200), primary_key=True)
    score: Mapped[float] = mapped_column(Float)


class DuplicateLinkRow(Base):
    """Two images the duplicate scan found to be copies of one another, at one tier (a < b)."""

    __tablename__ = "duplicate_links"
    __table_args__ = (Index("ix_duplicate_links_b", "b_id"),)

    a_id: Mapped[int] = mapped_column(ImageId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    b_id: Mapped[int] = mapped_column(ImageId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    tier: Mapped[str] = mapped_column(String(16))  # identical | copy | near
    score: Mapped[float] = mapped_column(Float)  # the tier's evidence: 1, signature correlation, cosine
    cosine: Mapped[float | None] = mapped_column(Float)


class DuplicateCheckRow(Base):
    """An image the duplicate scan has compared with the collection, and the content it compared:
    a file whose content changed since is checked again."""

    __tablename__ = "duplicate_checks"

    image_id: Mapped[int] = mapped_column(ImageId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The check's generation (DuplicateGenerationRow): a process keeping every signature in memory
    # asks which images were checked since the generation it last saw, whoever checked them.
    generation: Mapped[int | None] = mapped_column(BigInteger, index=True)


class DuplicateGenerationRow(Base):
    """One committed duplicate check (a run's, an upload's, a whole scan's), numbered in commit
    order. The token tells a copy of the signatures kept since that generation whether this is
    still the database it was read from: one restored or replaced since may hold the number with
    another history."""

    __tablename__ = "duplicate_generations"

    generation: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    token: Mapped[str] = mapped_column(String(32))
    made_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DistinctPairRow(Base):
    """A person said these two images are not duplicates (a < b); the scan's link is ignored."""

    __tablename__ = "duplicate_distinct"

    a_id: Mapped[int] = mapped_column(ImageId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    b_id: Mapped[int] = mapped_column(ImageId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class KeepChoiceRow(Base):
    """A person chose this image as the one to keep of its group, which then had `members`.
    The group counts as resolved until a member outside that list joins it."""

    __tablename__ = "duplicate_keeps"

    image_id: Mapped[int] = mapped_column(ImageId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    members: Mapped[list] = mapped_column(JSON)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
