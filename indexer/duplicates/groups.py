"""Duplicate groups: connected components of the links at a tier and the stronger ones.

`--tier copy` groups through identical and copy links; `near` through all three. Every link keeps
its own tier and score, and a group is named by its weakest link, so a near-duplicate never
passes for a copy. Links a person marked "not duplicates" are cut before components are formed;
a group whose members a "keep this one" choice covered is resolved and left out of the listing
(`include_resolved` shows it) until a new member joins it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sqlalchemy import func, select

from indexer import store
from indexer.duplicates import keep
from indexer.duplicates.evidence import COPY, IDENTICAL, NEAR, RANK, TIERS
from indexer.errors import LookalikeError
from indexer.models import DistinctPairRow, DuplicateLinkRow, ImageRow, KeepChoiceRow


@dataclass
class Link:
    a: int
    b: int
    tier: str
    score: float

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "tier": self.tier, "score": self.score}


@dataclass
class Member:
    id: int
    path: str
    size: int
    width: int | None
    height: int | None
    format: str | None
    mtime_ns: int
    has_file: bool
    keep: bool = False

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "path": self.path,
            "size": self.size,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "has_file": self.has_file,  # False: imported, its file (and thumbnail) is on another host
            "keep": self.keep,
        }


@dataclass
class Group:
    tier: str
    members: list[Member]
    links: list[Link]
    keep_id: int
    keep_reason: str
    resolved: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def best_score(self) -> float:
        return max((link.score for link in self.links), default=1.0)

    def to_json(self) -> dict:
        return {
            "tier": self.tier,
            "size": len(self.members),
            "keep": self.keep_id,
            "keep_reason": self.keep_reason,
            "resolved": self.resolved,
            "members": [m.to_json() for m in self.members],
            "links": [link.to_json() for link in self.links],
        }


def check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise LookalikeError(f"unknown tier {tier!r}: use one of {', '.join(TIERS)}")
    return tier


def links_at(session, tier: str = NEAR, min_score: float | None = None) -> list[Link]:
    """Every link at `tier` or a stronger one, less the pairs people marked distinct."""
    check_tier(tier)
    out = _identical_links(session)
    if RANK[tier] >= RANK[COPY]:
        wanted = [t for t in (COPY, NEAR) if RANK[t] <= RANK[tier]]
        query = select(DuplicateLinkRow.a_id, DuplicateLinkRow.b_id, DuplicateLinkRow.tier, DuplicateLinkRow.score)
        query = query.where(DuplicateLinkRow.tier.in_(wanted))
        if min_score is not None:
            query = query.where(DuplicateLinkRow.score >= min_score)
        out += [Link(int(a), int(b), t, float(s)) for a, b, t, s in session.execute(query)]
    distinct = {(int(a), int(b)) for a, b in session.execute(select(DistinctPairRow.a_id, DistinctPairRow.b_id))}
    return [link for link in out if (link.a, link.b) not in distinct]


def _identical_links(session) -> list[Link]:
    """Files with one content hash: each linked to the group's first (smallest id)."""
    shared = (
        select(ImageRow.content_hash)
        .where(ImageRow.status.in_((store.STATUS_INDEXED, store.STATUS_IMPORTED)), ImageRow.content_hash.is_not(None))
        .group_by(ImageRow.content_hash)
        .having(func.count() > 1)
    )
    rows = session.execute(
        select(ImageRow.content_hash, ImageRow.id)
        .where(ImageRow.content_hash.in_(shared), ImageRow.status.in_((store.STATUS_INDEXED, store.STATUS_IMPORTED)))
        .order_by(ImageRow.content_hash, ImageRow.id)
    ).all()
    first: dict[str, int] = {}
    links = []
    for digest, image_id in rows:
        if digest in first:
            links.append(Link(first[digest], int(image_id), IDENTICAL, 1.0))
        else:
            first[digest] = int(image_id)
    return links


def components(links: list[Link]) -> list[tuple[np.ndarray, list[Link]]]:
    """(member ids, their links) of each connected component with two or more members."""
    if not links:
        return []
    a = np.array([link.a for link in links], np.int64)
    b = np.array([link.b for link in links], np.int64)
    ids, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inverse[: len(a)], inverse[len(a) :]
    graph = coo_matrix((np.ones(len(a), np.int8), (ia, ib)), shape=(len(ids), len(ids)))
    count, label = connected_components(graph, directed=False)
    members: dict[int, list[int]] = defaultdict(list)
    for node, comp in enumerate(label):
        members[int(comp)].append(int(ids[node]))
    by_comp: dict[int, list[Link]] = defaultdict(list)
    for link, node in zip(links, ia):
        by_comp[int(label[node])].append(link)
    return [(np.array(members[c], np.int64), by_comp[c]) for c in range(count)]


def list_groups(
    session,
    tier: str = NEAR,
    *,
    min_score: float | None = None,
    folder: str | None = None,
    prefer: tuple[str, ...] = (),
    include_resolved: bool = False,
    image_id: int | None = None,
) -> list[Group]:
    """The groups, largest first (then best linked, then first member), with their keep picks."""
    found = components(links_at(session, tier, min_score))
    if image_id is not None:
        found = [(ids, links) for ids, links in found if image_id in ids]
    rows = store.images_by_ids(session, [int(i) for ids, _ in found for i in ids])
    choices = {
        int(i): set(members) for i, members in session.execute(select(KeepChoiceRow.image_id, KeepChoiceRow.members))
    }
    root = os.path.join(os.path.abspath(folder), "") if folder else None
    groups = []
    for ids, links in found:
        members = [_member(rows[int(i)]) for i in sorted(ids) if int(i) in rows]
        if len(members) < 2:
            continue
        if root and not any(os.path.abspath(m.path).startswith(root) for m in members):
            continue
        member_ids = {m.id for m in members}
        chosen = next((i for i in sorted(member_ids) if i in choices), None)
        resolved = chosen is not None and member_ids <= choices[chosen]
        if resolved and not include_resolved:
            continue
        keep_id, reason = keep.pick([_candidate(m) for m in members], prefer, chosen)
        for m in members:
            m.keep = m.id == keep_id
        weakest = max((link.tier for link in links), key=lambda t: RANK[t])
        links.sort(key=lambda link: (RANK[link.tier], -link.score, link.a, link.b))
        groups.append(Group(weakest, members, links, keep_id, reason, resolved))
    groups.sort(key=lambda g: (-len(g.members), -g.best_score, g.members[0].id))
    return groups


def _member(row: ImageRow) -> Member:
    return Member(
        row.id, row.path, row.size, row.width, row.height, row.format, row.mtime_ns, row.status == store.STATUS_INDEXED
    )


def _candidate(m: Member) -> keep.Candidate:
    return keep.Candidate(m.id, m.path, m.size, m.width, m.height, m.format, m.mtime_ns)


# -- badges: the groups of a few images (search results), without computing every component ------

BADGE_STEPS = 32  # breadth-first steps before the walk gives up for the full computation
_LISTED = (store.STATUS_INDEXED, store.STATUS_IMPORTED)  # as _identical_links


def badges(session, ids) -> dict[int, dict]:
    """Image id -> {"tier", "size"} of the strongest group each of `ids` belongs to, for the ones in
    a group: its copy group (named "identical" when only identical links hold it, as list_groups
    names it) if it has one, else its near-duplicate group. Resolved groups count too.

    Walks out from `ids` over the links (a few indexed queries per step) instead of forming every
    component, so a page of search results costs about its own groups (100k images, 20k links on
    SQLite: 4 ms for 24 results, against 150 ms to form every component); a long chain of links
    falls back on the full computation after BADGE_STEPS steps."""
    ids = {int(i) for i in ids}
    links = _links_around(session, ids)
    if links is None:
        links = links_at(session, NEAR)
    strong = [link for link in links if link.tier != NEAR]
    out: dict[int, dict] = {}
    for level in (strong, links):
        for members, group_links in components(level):
            weakest = max((link.tier for link in group_links), key=lambda t: RANK[t])
            for i in ids.intersection(int(m) for m in members):
                out.setdefault(i, {"tier": weakest, "size": len(members)})
    return out


def _links_around(session, start: set[int]) -> list[Link] | None:
    """Every link of the components holding `start` (all tiers, less the pairs marked distinct);
    None when the walk takes more than BADGE_STEPS steps."""
    seen, frontier = set(start), set(start)
    hashes: set[str] = set()
    found: dict[tuple[int, int, str], Link] = {}
    for _ in range(BADGE_STEPS):
        if not frontier:
            return list(found.values())
        new: list[Link] = []
        fresh_hashes: set[str] = set()
        for chunk in store.chunks(sorted(frontier)):
            columns = (DuplicateLinkRow.a_id, DuplicateLinkRow.b_id, DuplicateLinkRow.tier, DuplicateLinkRow.score)
            for end in (DuplicateLinkRow.a_id, DuplicateLinkRow.b_id):  # two indexed lookups, not an OR
                rows = session.execute(select(*columns).where(end.in_(chunk), DuplicateLinkRow.tier.in_((COPY, NEAR))))
                new += [Link(int(a), int(b), t, float(s)) for a, b, t, s in rows]
            # Statuses are checked here, not in SQL: SQLite would pick the status index and scan.
            rows = session.execute(select(ImageRow.content_hash, ImageRow.status).where(ImageRow.id.in_(chunk)))
            fresh_hashes.update(digest for digest, status in rows if digest is not None and status in _LISTED)
        fresh_hashes -= hashes
        hashes |= fresh_hashes
        for chunk in store.chunks(sorted(fresh_hashes)):
            rows = session.execute(
                select(ImageRow.content_hash, ImageRow.id, ImageRow.status).where(ImageRow.content_hash.in_(chunk))
            )
            first: dict[str, int] = {}
            # The same star as _identical_links: each file linked to the first (smallest id) of its hash.
            for digest, image_id in sorted((d, int(i)) for d, i, status in rows if status in _LISTED):
                if digest in first:
                    new.append(Link(first[digest], int(image_id), IDENTICAL, 1.0))
                else:
                    first[digest] = int(image_id)
        new = [link for link in new if (link.a, link.b, link.tier) not in found]
        cut: set[tuple[int, int]] = set()
        for chunk in store.chunks(sorted({link.a for link in new})):
            query = select(DistinctPairRow.a_id, DistinctPairRow.b_id).where(DistinctPairRow.a_id.in_(chunk))
            cut.update((int(a), int(b)) for a, b in session.execute(query))
        frontier = set()
        for link in new:
            if (link.a, link.b) in cut:
                continue
            found[(link.a, link.b, link.tier)] = link
            frontier.update(n for n in (link.a, link.b) if n not in seen)
        seen |= frontier
    return None
