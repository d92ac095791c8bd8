"""The HTTP API under hostile input: property-based fuzzing against its own OpenAPI schema
(schemathesis), and hand-written malformed requests.

A small home folder is indexed with the real pipeline; the schema is loaded from the real ASGI
app's `/openapi.json` and every operation is called in process, through FastAPI's routing,
validation, middleware and error handlers. Every response must be a non-5xx answer that conforms
to what the schema declares (status code, content type, body), invalid input must be refused
with a 4xx, and no response may carry a Python traceback.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from schemathesis.python import asgi as schemathesis_asgi
from sqlalchemy import select

import databases
from conftest import SAMPLES
from indexer.heads.examples import put_examples
from indexer.heads.tagging import backbone_id_of
from indexer.heads.teach import train_from_examples
from indexer.library import Library
from indexer.models import ImageRow
from indexer.pipeline import index_folders
from indexer.settings import Settings
from service.app import create_app
from service.filters import MAX_TERMS
from service.routes.search import MAX_K

TAUGHT = "taught"
MAX_EXAMPLES = 30  # per operation and generation mode (and per pinned strategy set)
TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'File "/', "site-packages", '.py", line')

# Conformance and rejection checks for every case. `positive_data_acceptance` is only applied to
# cases built from real ids and real photos: a schema cannot say "an indexed id" or "a decodable
# image", so random schema-valid ids are rightly 404 and random bytes rightly 415/422.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@dataclass
class Home:
    settings: Settings
    photos: Path
    ids: list[int]


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_cache) -> Iterator[Home]:
    with pytest.MonkeyPatch.context() as mp:
        databases.clear_settings(mp)
        root = tmp_path_factory.mktemp("fuzz")
        photos = root / "photos"
        for path in sorted(SAMPLES.rglob("*.jpg"))[::10]:
            dest = photos / path.parent.name / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        settings = Settings(home=root / "home", model_cache=model_cache, reload_interval=0)
        library = Library(settings)
        report = index_folders(library, [str(photos)])
        assert report.failed == [] and report.added == 8
        with library.sessions() as session:
            ids = sorted(session.scalars(select(ImageRow.id)))
        # A head taught by examples, for the teaching routes' pinned cases.
        with library.sessions.begin() as session:
            examples = [(i, ["a"]) for i in ids[:4]] + [(i, ["b"]) for i in ids[4:]]
            put_examples(session, TAUGHT, "binary", examples, positive="a", backbone_id=backbone_id_of(library))
        train_from_examples(library, TAUGHT)
        library.close()
        yield Home(settings, photos, ids)


@dataclass
class Tally:
    cases: int = 0
    by_operation: collections.Counter = field(default_factory=collections.Counter)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    leaks: list[str] = field(default_factory=list)
    no_invalid_input: list[str] = field(default_factory=list)


def _strategies(operation, home: Home, jpeg: bytes) -> list[tuple[str, object, list]]:
    """(name, strategy, extra checks) for one operation: generated positive and negative cases,
    plus positive cases pinned to real ids, the built-in head and a real photo."""
    out = [
        ("positive", operation.as_strategy(GenerationMode.POSITIVE), []),
        ("negative", operation.as_strategy(GenerationMode.NEGATIVE), []),
    ]
    pinned = []
    if "{image_id}" in operation.path:
        pinned += [
            operation.as_strategy(GenerationMode.POSITIVE, path_parameters={"image_id": i}) for i in home.ids[:3]
        ]
    if "{name}" in operation.path:
        teaching = operation.path not in ("/heads/{name}", "/heads/{name}/plots/{file}")
        # The teaching routes' writes take bodies whose meaning no schema holds (which labels a
        # head's type allows, enough examples to train): only their reads are pinned, to a head
        # taught by examples; the other head routes to the built-in one.
        if not teaching or operation.method.upper() == "GET":
            name = TAUGHT if teaching else "imagenet"
            pinned.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters={"name": name}))
    if operation.path == "/search":
        # Real examples by id. (A schema's array of binary parts is sent without file names,
        # which makes them form fields, not files: real uploads are pinned in test_api.py.)
        pinned.append(
            operation.as_strategy(
                GenerationMode.POSITIVE,
                query={"positive": home.ids[:2], "negative": home.ids[2:3]},
                body={},
                media_type="multipart/form-data",
            )
        )
    if pinned:
        out.append(("pinned", st.one_of(pinned), [positive_data_acceptance]))
    return out


def _fuzz(operation, mode: str, strategy, extra_checks: list, tally: Tally) -> None:
    """Up to MAX_EXAMPLES cases from `strategy`, each called through the app and checked; a
    failure is recorded (not raised), so every operation runs and all findings are reported."""

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,  # the same cases on every run
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        response = case.call()
        tally.cases += 1
        tally.by_operation[operation.label] += 1
        tally.statuses[(operation.label, mode, response.status_code)] += 1
        if response.status_code >= 500:
            tally.server_errors.append(f"{operation.label} [{mode}]: {response.status_code} {response.text[:300]}")
        text = response.content.decode("utf-8", "replace") if response.content else ""
        if any(marker in text for marker in TRACEBACK_MARKERS):
            tally.leaks.append(f"{operation.label}: {text[:300]}")
        try:
            case.validate_response(response, checks=CHECKS + extra_checks)
        except FailureGroup as group:
            kinds = ", ".join(sorted({type(e).__name__ for e in group.exceptions}))
            tally.failures.setdefault(f"{operation.label} [{mode}] {kinds}", str(group)[:2000])

    run()


def test_every_operation_conforms_to_its_schema_under_fuzzing(home, record_property):
    app = create_app(home.settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    jpeg = sorted(home.photos.rglob("*.jpg"))[0].read_bytes()
    tally = Tally()
    started = time.monotonic()
    try:
        operations = [result.ok() for result in schema.get_all_operations()]
        labels = {op.label for op in operations}
        assert {"POST /search", "GET /images/{image_id}", "GET /images/{image_id}/file", "GET /health"} <= labels

        for operation in operations:
            for mode, strategy, extra_checks in _strategies(operation, home, jpeg):
                try:
                    _fuzz(operation, mode, strategy, extra_checks, tally)
                except Unsatisfiable:
                    # Only where nothing can be invalid: no parameters, or only free-form strings.
                    assert mode == "negative", f"{operation.label} [{mode}]: not a single case could be generated"
                    tally.no_invalid_input.append(operation.label)
    finally:
        schemathesis_asgi.shutdown_lifespans()

    elapsed = time.monotonic() - started
    summary = (
        f"schemathesis: {tally.cases} cases over {len(operations)} operations in {elapsed:.1f} s, "
        f"{len(tally.server_errors)} server errors, {len(tally.failures)} distinct check failures"
    )
    print(summary)
    print(f"  no invalid input possible for: {', '.join(sorted(set(tally.no_invalid_input)))}")
    for (label, mode, status), count in sorted(tally.statuses.items()):
        print(f"  {label:40} {mode:9} {status}: {count}")
    record_property("schemathesis_cases", tally.cases)
    record_property("schemathesis_server_errors", len(tally.server_errors))

    assert tally.server_errors == [], tally.server_errors[:5]
    assert tally.leaks == [], tally.leaks[:5]
    assert tally.failures == {}, "\n\n".join(f"{k}:\n{v}" for k, v in tally.failures.items())
    # Something real ran: every operation, and the success paths were reached and validated too.
    assert tally.cases >= 10 * len(operations), summary
    assert all(tally.by_operation[op.label] >= 1 for op in operations)
    succeeded = {label for (label, _, status) in tally.statuses if 200 <= status < 300}
    # The built-in head has no plots; writes that need a real image or a head's examples to succeed
    # are not pinned (see _strategies) and succeed in test_teaching.py and test_uploads.py; decisions
    # about duplicates need a collection with duplicates, and succeed in test_duplicates.py.
    needs_meaning = {
        "POST /images",
        "DELETE /images/{image_id}",
        "POST /heads/{name}/train",
        "POST /heads/{name}/versions/{number}/activate",
        "DELETE /heads/{name}/examples/{image_id}",
        "POST /duplicates/distinct",
        "POST /duplicates/keep",
        "DELETE /duplicates/keep/{image_id}",
    }
    must_succeed = labels - {"GET /heads/{name}/plots/{file}"} - needs_meaning
    assert must_succeed <= succeeded, must_succeed - succeeded
    assert not {"POST /search", "GET /images/{image_id}"} & set(tally.no_invalid_input)
    rejected = {label for (label, mode, status) in tally.statuses if mode == "negative" and 400 <= status < 500}
    assert {"POST /search", "GET /images/{image_id}", "GET /images/{image_id}/similar"} <= rejected


def _call_without_key(operation, statuses: collections.Counter, failures: dict[str, str]) -> None:
    @given(case=operation.as_strategy(GenerationMode.POSITIVE))
    @settings(max_examples=5, deadline=None, derandomize=True, database=None, phases=[Phase.generate])
    def run(case) -> None:
        response = case.call()  # no key
        statuses[(operation.label, response.status_code)] += 1
        try:
            case.validate_response(
                response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance]
            )
        except FailureGroup as group:
            failures.setdefault(operation.label, str(group)[:2000])

    run()


def test_with_api_keys_every_refusal_is_declared_in_the_schema(home):
    """With keys configured, the schema (fetched with a key) declares the 401 answers, and a
    request without a key gets exactly that on every operation but /health."""
    keyed = home.settings.model_copy(update={"api_keys": ["fuzz-key"], "admin_keys": ["fuzz-admin"]})
    app = create_app(keyed)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"X-API-Key": "fuzz-key"})
    statuses: collections.Counter = collections.Counter()
    failures: dict[str, str] = {}
    try:
        for operation in [result.ok() for result in schema.get_all_operations()]:
            _call_without_key(operation, statuses, failures)
    finally:
        schemathesis_asgi.shutdown_lifespans()
    assert failures == {}, failures
    for (label, status), _ in statuses.items():
        assert status == (200 if label == "GET /health" else 401), (label, status)
    assert sum(statuses.values()) >= 11


# -- hand-written malformed requests --------------------------------------------------------------


@pytest.fixture(scope="module")
def client(home) -> Iterator[TestClient]:
    with TestClient(create_app(home.settings)) as test_client:
        yield test_client


def _jpeg(home: Home, n: int = 0) -> bytes:
    return sorted(home.photos.rglob("*.jpg"))[n].read_bytes()


def _assert_message(response, status: int | tuple[int, ...]) -> str:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert detail  # a message (or FastAPI's list of validation issues), never empty
    assert not any(marker in response.text for marker in TRACEBACK_MARKERS)
    return detail if isinstance(detail, str) else str(detail)


def test_wrong_content_types_are_415_with_a_message(client, home):
    jpeg = _jpeg(home)
    for kwargs in [
        {"json": {"file": "aGVsbG8=", "k": 3}},  # JSON instead of a form
        {"content": jpeg, "headers": {"content-type": "image/jpeg"}},  # raw bytes, no form
        {"content": b"file=abc", "headers": {"content-type": "text/plain"}},
        {"content": jpeg, "headers": {"content-type": "application/octet-stream"}},
        {"content": jpeg},  # no Content-Type at all
    ]:
        message = _assert_message(client.post("/search", **kwargs), 415)
        assert "multipart/form-data" in message
    # A form without the `file` part is a validation error naming the part.
    response = client.post("/search", data={"k": "3"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "file"]


def test_malformed_multipart_is_a_4xx_with_a_message(client, home):
    jpeg = _jpeg(home)
    part = b'Content-Disposition: form-data; name="file"; filename="q.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    cases = {
        "body uses another boundary": (
            b"multipart/form-data; boundary=right",
            b"--wrong\r\n" + part + jpeg + b"\r\n--wrong--\r\n",
        ),
        "no boundary parameter": (b"multipart/form-data", b"--x\r\n" + part + jpeg + b"\r\n--x--\r\n"),
        "boundary longer than the body": (b"multipart/form-data; boundary=" + b"b" * 200, b"--bbb\r\n" + part),
        "garbage body": (b"multipart/form-data; boundary=abc", os.urandom(2048)),
        "headers never end": (b"multipart/form-data; boundary=abc", b"--abc\r\n" + b"X-Junk: " + b"a" * 5000),
        "part without a name": (
            b"multipart/form-data; boundary=abc",
            b"--abc\r\nContent-Disposition: form-data\r\n\r\n" + jpeg + b"\r\n--abc--\r\n",
        ),
        "truncated, no closing boundary": (b"multipart/form-data; boundary=abc", b"--abc\r\n" + part + jpeg[:500]),
        "empty body": (b"multipart/form-data; boundary=abc", b""),
    }
    for name, (content_type, body) in cases.items():
        response = client.post("/search", content=body, headers={"content-type": content_type.decode()})
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        _assert_message(response, response.status_code)
    # The server is unharmed and still answers a well-formed upload.
    ok = client.post("/search", files={"file": ("q.jpg", jpeg, "image/jpeg")}, data={"k": "2"})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def test_k_is_bounded(client, home):
    image_id = home.ids[0]
    files = {"file": ("q.jpg", _jpeg(home), "image/jpeg")}
    for bad in ["0", "-1", str(MAX_K + 1), "abc", "1.5", "", "99999999999999999999999"]:
        _assert_message(client.get(f"/images/{image_id}/similar", params={"k": bad}), 422)
        _assert_message(client.post("/search", params={"k": bad}, files=files), 422)
        if bad:  # an empty form field means "not given": the query value (default 10) applies
            _assert_message(client.post("/search", data={"k": bad}, files=files), 422)
    assert client.get(f"/images/{image_id}/similar", params={"k": MAX_K}).status_code == 200
    assert client.post("/search", data={"k": str(MAX_K)}, files=files).status_code == 200


def test_filter_lists_are_bounded(client, home):
    image_id = home.ids[0]
    files = {"file": ("q.jpg", _jpeg(home), "image/jpeg")}
    for name in ["tag", "any_tag", "not_tag"]:
        at_limit = {name: [f"imagenet:label{i}" for i in range(MAX_TERMS)]}
        over = {name: [f"imagenet:label{i}" for i in range(MAX_TERMS + 1)]}
        assert client.get(f"/images/{image_id}/similar", params=at_limit).status_code == 200
        assert client.post("/search", params=at_limit, files=files).status_code == 200
        message = _assert_message(client.get(f"/images/{image_id}/similar", params=over), 422)
        assert str(MAX_TERMS) in message
        _assert_message(client.post("/search", params=over, files=files), 422)
    for bad in ["-0.1", "1.5", "nan", "abc"]:
        _assert_message(client.get(f"/images/{image_id}/similar", params={"min_score": bad}), 422)


def test_uploads_that_are_not_images(client):
    for data, status in [(b"", 422), (b"hello, world", 415), (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, (415, 422))]:
        _assert_message(client.post("/search", files={"file": ("q.jpg", data, "image/jpeg")}), status)


def test_an_internal_error_answers_500_without_a_traceback(home, tmp_path, caplog):
    """A real failure inside a route (the images table vanished under a running server): the
    client gets `{"detail": "internal error"}`; the traceback goes to the server's log only."""
    broken_home = tmp_path / "home"
    shutil.copytree(home.settings.home, broken_home)
    settings = home.settings.model_copy(update={"home": broken_home})
    with TestClient(create_app(settings), raise_server_exceptions=False) as broken:
        assert broken.get(f"/images/{home.ids[0]}").status_code == 200
        with sqlite3.connect(broken_home / "lookalike.db") as db:
            db.execute("ALTER TABLE images RENAME TO images_gone")
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="lookalike"):
            for url in [f"/images/{home.ids[0]}", f"/images/{home.ids[0]}/file", "/stats"]:
                response = broken.get(url)
                assert response.status_code == 500, (url, response.status_code, response.text)
                assert response.headers["content-type"] == "application/json"
                assert response.json() == {"detail": "internal error"}
                assert "images" not in response.text and "sqlite" not in response.text.lower()
        logged = [r for r in caplog.records if r.name == "lookalike" and r.exc_info]
        assert len(logged) == 3
        assert "no such table: images" in caplog.text and "Traceback" in caplog.text
        assert broken.get("/health").status_code == 200  # and it keeps serving
