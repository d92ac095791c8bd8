"""Teaching heads over HTTP: stored examples, training, versions, suggestions of what to label next."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from indexer.heads.examples import get_examples, put_examples, remove_example
from indexer.heads.storage import delete_head, head_row, versions_of
from indexer.heads.suggestions import MAX_SUGGESTIONS, suggestions_for
from indexer.heads.tagging import backbone_id_of
from indexer.heads.teach import Training, Trainings
from service.deps import ImageId, LibraryDep
from service.filters import TagFilterDep
from service.schemas import (
    ExamplesIn,
    ExamplesOut,
    SuggestionsOut,
    TrainingOut,
    VersionOut,
    error_responses,
)

router = APIRouter(prefix="/heads", tags=["teaching"], responses=error_responses(400, 404, 422))

STARTED = {202: {"model": TrainingOut, "description": "Started in the background: follow GET /heads/{name}/training"}}


def _trainings(request: Request) -> Trainings:
    return request.app.state.trainings


@router.get("/{name}/examples", response_model=ExamplesOut)
def examples(library: LibraryDep, name: str) -> dict:
    with library.sessions() as session:
        return get_examples(session, name).to_json()


@router.put("/{name}/examples", response_model=ExamplesOut)
def set_examples(library: LibraryDep, name: str, body: ExamplesIn) -> dict:
    """Add examples, or replace the labels of images the head has already; creates the head's examples on first use."""
    backbone_id = backbone_id_of(library)
    with library.sessions.begin() as session:
        found = put_examples(
            session,
            name,
            body.type,
            [(e.image_id, e.labels) for e in body.examples],
            positive=body.positive,
            backbone_id=backbone_id,
        )
        return found.to_json()


@router.delete("/{name}/examples/{image_id}", status_code=204)
def delete_example(library: LibraryDep, name: str, image_id: ImageId) -> None:
    with library.sessions.begin() as session:
        remove_example(session, name, image_id)


@router.post("/{name}/train", responses=STARTED | error_responses(409))
def train(request: Request, name: str) -> JSONResponse:
    """Train on the stored examples, store a new version and re-tag the collection.

    200 with the training report when done; 202 when the collection is large enough to re-tag in
    the background (searches see the old tags until the new ones are all written)."""
    job, finished = _trainings(request).train(name)
    return _answer(job, finished)


@router.get("/{name}/training", response_model=TrainingOut, responses=error_responses(404))
def training(request: Request, library: LibraryDep, name: str) -> dict:
    """The latest training or version change of this head started by this server, with its progress."""
    job = _trainings(request).latest(name)
    if job is None:
        with library.sessions() as session:
            get_examples(session, name)  # an unknown head is a 404
        return Training(name, None, state="idle").to_json()  # nothing started by this server
    return job.to_json()


@router.get("/{name}/versions", response_model=list[VersionOut])
def versions(library: LibraryDep, name: str) -> list[dict]:
    with library.sessions() as session:
        current = head_row(session, name).version
        return [
            {
                "number": v.number,
                "current": v.number == current,
                "created_at": v.created_at,
                "examples": (v.metrics or {}).get("examples"),
                "metrics": (v.metrics or {}).get("metrics", {}),
            }
            for v in versions_of(session, name)
        ]


@router.post("/{name}/versions/{number}/activate", responses=STARTED | error_responses(409))
def activate(request: Request, name: str, number: Annotated[int, PathParam(ge=1, le=2**31 - 1)]) -> JSONResponse:
    """Make an earlier (or later) version current again, and re-tag the collection with it."""
    job, finished = _trainings(request).activate(name, number)
    return _answer(job, finished)


def _answer(job, finished: bool) -> JSONResponse:
    if finished:
        return JSONResponse(job.report)
    return JSONResponse(job.to_json(), status_code=202, headers={"Location": f"/heads/{job.head}/training"})


@router.delete("/{name}", status_code=204)
def remove_head(library: LibraryDep, name: str) -> None:
    """Delete a head: its versions, its tags and its examples."""
    with library.write_lock():
        with library.sessions.begin() as session:
            delete_head(session, name)
    library.head_retagged(name, {})


@router.get("/{name}/suggestions", response_model=SuggestionsOut)
def suggestions(
    library: LibraryDep,
    name: str,
    tag_filter: TagFilterDep,
    n: Annotated[int, Query(ge=1, le=MAX_SUGGESTIONS)] = 12,
) -> dict:
    """The unlabelled images most worth labelling next, each with its reason."""
    found = suggestions_for(library, name, n, tag_filter)
    return {"suggestions": [s.to_json() for s in found]}
