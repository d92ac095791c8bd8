"""When the index changes shape: the switch to an approximate segment past a size, compaction of
the growing segment and tombstones into a new segment, re-training when the collection has
outgrown the trained lists, and the switch back to the exact layout when deletions have shrunk
the collection well below the threshold (or the threshold was turned off).

Each step writes its new files under names no manifest uses yet, then saves a manifest naming
them: that one rename is the swap. A server keeps serving the generation it loaded until it
sees the new manifest; a kill at any point leaves the previous generation whole (the unused
files are removed by the next save). Writers call this holding the home's write lock.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from indexer.ann import AnnSegment, build_segment, compact_segment
from indexer.faults import checkpoint
from indexer.settings import Settings
from indexer.vector_index import VectorIndex

# Re-train when the collection has grown to this many times what the lists were trained for:
# the best list count grows with sqrt(N), so at 4x the lists are half as many as they should be.
RETRAIN_GROWTH = 4.0
# Compact when this fraction of the segment's vectors are tombstones: they are still scanned.
COMPACT_TOMBSTONE_FRACTION = 0.1
# The steps that may run in a process of their own (indexer.background_compaction): the index
# they start from serves correctly meanwhile. The switch and the way back run in the writer.
BACKGROUND_STEPS = ("compact", "retrain")
# Back to the exact layout below this fraction of the threshold: the gap keeps a collection that
# hovers around the threshold from switching layouts (and rebuilding) on every save.
FLATTEN_FRACTION = 0.5


def due(index: VectorIndex, settings: Settings) -> str | None:
    """What the index needs now: "build", "retrain", "compact", "flatten", or None."""
    n = len(index)
    if index.ann is None:
        return "build" if settings.ann_threshold and n >= settings.ann_threshold else None
    if not settings.ann_threshold or n < FLATTEN_FRACTION * settings.ann_threshold:
        return "flatten"
    if n > RETRAIN_GROWTH * index.ann.params.get("trained_for", n):
        return "retrain"
    if index.growing >= settings.compact_at or len(index.tombstones) >= COMPACT_TOMBSTONE_FRACTION * len(index.ann):
        return "compact"
    return None


def maintain(
    index: VectorIndex, folder: Path, backbone: str, settings: Settings, notify: Callable[[str], None]
) -> VectorIndex:
    """Do what is due and save; returns the index to serve from now on (`index` when nothing was)."""
    step = due(index, settings)
    if step is None:
        return index
    if step == "flatten":
        return _flatten(index, folder, backbone, notify)
    generation = index.generation + 1  # the save below writes this generation
    segment = new_segment(index, step, folder, f"segment-{generation:06d}", settings, notify)
    rebuilt = VectorIndex(index.dim, generation=index.generation, ann=segment)
    checkpoint("ann-swap", folder)
    rebuilt.save(folder, backbone)
    return rebuilt


def new_segment(
    index: VectorIndex, step: str, folder: Path, name: str, settings: Settings, notify: Callable[[str], None]
) -> AnnSegment:
    """The segment that `step` ("build", "retrain" or "compact") makes of `index`'s live vectors,
    written to `folder` under `name`; nothing names it yet."""
    count = len(index)
    if step == "compact":
        notify(f"compacting {index.growing} new vectors and {len(index.tombstones)} tombstones into the segment")
        return compact_segment(
            folder,
            name,
            index.ann,
            index.iter_sorted,
            count,
            removed=index.tombstones,
            added=index.growing_vectors(),
            recall_target=settings.ann_recall_target,
            notify=notify,
        )
    why = "the collection reached" if step == "build" else "re-training the lists for"
    notify(f"{why} {count} vectors: building an approximate index while the current one keeps serving")
    return build_segment(
        folder, name, index.iter_sorted, count, index.dim, recall_target=settings.ann_recall_target, notify=notify
    )


def _flatten(index: VectorIndex, folder: Path, backbone: str, notify: Callable[[str], None]) -> VectorIndex:
    """The live vectors as one exact index; its save's manifest no longer names the segment, whose
    files that save then removes."""
    notify(f"{len(index)} vectors: back to the exact index")
    exact = VectorIndex(index.dim, generation=index.generation)
    for ids, vectors in index.iter_sorted():
        exact.add(ids, vectors)
    checkpoint("ann-swap", folder)
    exact.save(folder, backbone)
    return exact
