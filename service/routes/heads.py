"""Heads and the tags they wrote."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse

from indexer.heads.examples import example_counts
from indexer.heads.plots import PLOT_FILES, plot_folder, render_missing  # no other file name is ever served
from indexer.heads.storage import list_heads
from indexer.heads.workflow import head_report
from service.deps import LibraryDep
from service.schemas import HeadOut, HeadSummary, error_responses

router = APIRouter(tags=["heads"])


@router.get("/tags", response_model=dict[str, dict[str, int]])
def tag_counts(library: LibraryDep) -> dict:
    """Per head: each label with the number of images carrying it."""
    return library.tag_index().counts()


@router.get("/heads", response_model=list[HeadSummary])
def heads(library: LibraryDep) -> list[dict]:
    """Trained heads, and heads that have examples but no training yet (`trained: false`)."""
    with library.sessions() as session:
        counts = example_counts(session)
        out = [
            {
                "name": r.name,
                "type": r.kind,
                "labels": list(r.labels),
                "builtin": r.builtin,
                "trained": True,
                "version": r.version,
                "examples": counts.pop(r.name, (None, None, 0))[2],
            }
            for r in list_heads(session)
        ]
        for name, (kind, labels, count) in counts.items():
            out.append(
                {"name": name, "type": kind, "labels": labels, "builtin": False, "trained": False, "examples": count}
            )
        return sorted(out, key=lambda head: head["name"])


@router.get("/heads/{name}", response_model=HeadOut, responses=error_responses(404))
def head(library: LibraryDep, name: str) -> dict:
    return head_report(library, name)


@router.get(
    "/heads/{name}/plots/{file}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "Unknown head or plot"}},
)
def head_plot(
    library: LibraryDep,
    name: str,
    file: str,
    plot_set: str | None = Query(
        None, alias="set", description="the training whose plot this is (a report's plot_set); default: the current"
    ),
):
    """One of the plots saved when the head was trained: loss.png, confusion_matrix.png or precision_recall.png."""
    if file not in PLOT_FILES:
        raise HTTPException(status_code=404, detail=f"no plot named {file!r}; plots are {', '.join(PLOT_FILES)}")
    report = head_report(library, name)  # an unknown head is a 404 too
    report_dir = report["report_dir"]
    folder = plot_folder(Path(report_dir), plot_set or report["metrics"].get("plot_set")) if report_dir else None
    path = render_missing(folder, file) if folder is not None else None
    if path is None:
        raise HTTPException(status_code=404, detail=f"head {name!r} has no {file}")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})
