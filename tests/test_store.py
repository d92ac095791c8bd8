"""The store where databases differ, on the selected database (`--database=postgres` runs these on
PostgreSQL): lookups by more values than one statement can bind (PostgreSQL takes 65535), LIKE
wildcards in folder names, NUL in stored text, listings in one order whatever the collation, and
image ids beyond 32 and 64 bits.

No model is loaded: rows are written with store.write_images and 4-dimensional vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select, text

from indexer import store
from indexer.heads.model import MULTICLASS, Head
from indexer.heads.storage import list_heads, load_heads, save_head, tags_of, write_tags
from indexer.library import Library
from indexer.models import ImageRow
from indexer.stats import collect_stats

pytestmark = pytest.mark.storage

DIM = 4


@pytest.fixture
def library(settings):
    library = Library(settings)  # creates the schema: the test's own SQLite file or PostgreSQL database
    yield library
    library.close()


def add_images(library: Library, paths: list[str], errors: dict[str, str] | None = None) -> dict[str, int]:
    """Rows for `paths` (indexed with a vector, or failed with errors[path]); returns path -> id."""
    errors = errors or {}
    rng = np.random.default_rng(len(paths))
    items = []
    for number, path in enumerate(paths):
        vector = rng.normal(size=DIM).astype(np.float32)
        failed = errors.get(path)
        items.append(
            store.NewImage(
                path,
                size=100 + number,
                mtime_ns=number,
                content_hash=None if failed else f"hash-{path}",
                error=failed,
                vector=None if failed else vector / np.linalg.norm(vector),
            )
        )
    with library.sessions.begin() as session:
        backbone = store.ensure_backbone(session, "test-backbone", DIM)
        ids = store.write_images(session, items, backbone.id, [])
    return dict(zip(paths, ids))


def test_lookups_by_more_values_than_one_statement_can_bind(library):
    ids = add_images(library, [f"/photos/{n}.jpg" for n in range(6)])
    many = 70_000  # more than PostgreSQL's 65535 parameters per statement
    paths = [f"/elsewhere/{n}.jpg" for n in range(many)] + list(ids)
    image_ids = list(range(10**6, 10**6 + many)) + list(ids.values())
    head = Head("size", MULTICLASS, ["a", "b"], np.eye(2, DIM, dtype=np.float32), np.zeros(2, np.float32))
    with library.sessions.begin() as session:
        backbone_id = store.backbone_in_use(session).id
        save_head(session, head, backbone_id, metrics={})
        (stored,) = load_heads(session, backbone_id, ["size"])
        vectors = np.eye(len(image_ids), DIM, dtype=np.float32)
        written = write_tags(session, [stored], np.array(list(ids.values())), vectors[: len(ids)], None)
    assert written >= len(ids)

    with library.sessions() as session:
        assert store.ids_by_path(session, paths) == ids
        assert set(store.files_by_paths(session, paths)) == set(ids)
        assert sorted(store.images_by_ids(session, image_ids)) == sorted(ids.values())
        tags = tags_of(session, image_ids)
        assert len(tags) == len(image_ids) and all(tags[i] for i in ids.values())
        hashes = [f"hash-/elsewhere/{n}.jpg" for n in range(many)] + ["hash-/photos/0.jpg"]
        assert set(store.vectors_by_hash(session, hashes, backbone_id)) == {"hash-/photos/0.jpg"}
        found = [int(i) for part in store.iter_vectors(session, backbone_id, ids=image_ids) for i in part[0]]
        assert sorted(found) == sorted(ids.values())
    with library.sessions.begin() as session:
        store.delete_images(session, image_ids)
    with library.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ImageRow)) == 0


def test_folder_names_with_like_wildcards_match_only_themselves(library):
    roots = ["/p/a_b", "/p/50%", "/p/back\\slash", "/p/Case"]
    inside = {root: [f"{root}/1.jpg", f"{root}/deeper/2.jpg"] for root in roots}
    decoys = [
        "/p/aXb/1.jpg",  # _ is any one character to LIKE
        "/p/50 percent/1.jpg",  # % is anything
        "/p/backXslash/1.jpg",
        "/p/back/slash/1.jpg",
        "/p/case/1.jpg",  # SQLite's LIKE ignores ASCII case
        "/p/Case.jpg",  # beside the folder, not in it
        "/p/a_bc/1.jpg",
    ]
    add_images(library, [path for paths in inside.values() for path in paths] + decoys)
    with library.sessions() as session:
        for root, paths in inside.items():
            assert sorted(store.files_under(session, root)) == sorted(paths), root
            assert sorted(store.files_under(session, root + "/")) == sorted(paths), root


def test_text_with_nul_is_stored(library):
    """A decoder's reason may quote bytes of a hostile file; PostgreSQL's text cannot hold NUL, and
    one such reason failed the whole batch there."""
    reason = "cannot decode image (SyntaxError: bad chunk 'ab\x00cd')"
    ids = add_images(library, ["/p/ok.jpg", "/p/bad.jpg"], errors={"/p/bad.jpg": reason})
    with library.sessions() as session:
        assert store.failures(session) == [("/p/bad.jpg", reason.replace("\x00", "\\x00"))]
        assert store.get_image(session, ids["/p/ok.jpg"]).status == store.STATUS_INDEXED


def test_listings_are_in_code_point_order_on_every_database(library):
    """Failures (stats) and heads (heads list, /heads) come in Python's sorted() order, as on SQLite,
    not in the PostgreSQL database's collation (en-US: a < B < é < Z)."""
    paths = ["/p/B.jpg", "/p/a.jpg", "/p/Z/1.jpg", "/p/é.jpg", "/p/_x.jpg", "/p/b-2.jpg", "/p/b2.jpg"]
    add_images(library, paths, errors={path: "not a supported image" for path in paths})
    with library.sessions() as session:
        assert [path for path, _ in store.failures(session)] == sorted(paths)
    assert [f["path"] for f in collect_stats(library)["failures"]] == sorted(paths)

    names = ["Zeta", "alpha", "Beta", "_private", "émigré", "beta2"]
    with library.sessions.begin() as session:
        backbone_id = store.backbone_in_use(session).id
        for name in names:
            head = Head(name, MULTICLASS, ["x", "y"], np.eye(2, DIM, dtype=np.float32), np.zeros(2, np.float32))
            save_head(session, head, backbone_id, metrics={})
    with library.sessions() as session:
        assert [row.name for row in list_heads(session)] == sorted(names)
        assert [stored.head.name for stored in load_heads(session, backbone_id)] == sorted(names)


def test_odd_paths_are_stored_and_found_exactly(library):
    """Names Linux allows: the same text in NFC and NFD stays two rows, whatever the collation."""
    paths = [
        "/p/caf\u00e9.jpg",  # NFC
        "/p/cafe\u0301.jpg",  # NFD: another file
        "/p/new\nline.jpg",
        "/p/tab\there.jpg",
        "/p/quote'and\"double.jpg",
        "/p/emoji \U0001f600.jpg",
        "/p/CAFÉ.jpg",
        "/p/\u202eright-to-left.jpg",
    ]
    ids = add_images(library, paths)
    assert len(set(ids.values())) == len(paths)
    with library.sessions() as session:
        assert store.ids_by_path(session, paths) == ids
        assert {path: store.image_id_for_path(session, path) for path in paths} == ids
        assert sorted(store.files_under(session, "/p")) == sorted(paths)


@pytest.mark.parametrize("image_id", [2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1])
def test_unknown_ids_up_to_and_beyond_64_bits_name_no_image(library, image_id):
    add_images(library, ["/p/1.jpg"])
    with library.sessions() as session:
        assert store.get_image(session, image_id) is None
        assert store.images_by_ids(session, [image_id, 1]).keys() == {1}


def test_image_ids_beyond_32_bits_work(library):
    """Ids are 64-bit on every database (migration 0004): numbering past 2**31 goes on working."""
    start = 2**31 + 10
    with library.sessions.begin() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text(f"ALTER SEQUENCE images_id_seq RESTART WITH {start}"))
        else:  # SQLite numbers a new row one past the largest rowid
            session.execute(
                text(
                    "INSERT INTO images (id, path, size, mtime_ns, status, indexed_at) "
                    f"VALUES ({start - 1}, '/p/seed.jpg', 1, 1, 'failed', '2024-01-01')"
                )
            )
    ids = add_images(library, ["/p/a.jpg", "/p/b.jpg"])
    assert sorted(ids.values()) == [start, start + 1]
    head = Head("kind", MULTICLASS, ["a", "b"], np.eye(2, DIM, dtype=np.float32), np.zeros(2, np.float32))
    with library.sessions.begin() as session:
        backbone_id = store.backbone_in_use(session).id
        save_head(session, head, backbone_id, metrics={})
        (stored,) = load_heads(session, backbone_id, ["kind"])
        write_tags(session, [stored], np.array(list(ids.values())), np.eye(2, DIM, dtype=np.float32), None)
    with library.sessions() as session:
        assert store.get_image(session, start).path == "/p/a.jpg"
        assert {i: c.path for i, c in store.search_candidates(session, ids.values()).items()} == {
            v: k for k, v in ids.items()
        }
        assert [t["label"] for t in tags_of(session, [start])[start]] == ["a"]
    # A fresh open checks the FAISS index against the database and keys the vectors by these ids.
    fresh = Library(library.settings)
    assert sorted(fresh.index().ids().tolist()) == [start, start + 1]
    fresh.close()
