"""One status code and one stable message per error type."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from indexer.errors import (
    BackboneMismatch,
    BadExamples,
    BadQuery,
    Conflict,
    ImageRejected,
    IndexBusy,
    LookalikeError,
    NotIndexed,
    UnsupportedImage,
)
from indexer.heads.storage import UnknownHead

log = logging.getLogger("lookalike")

INTERNAL_ERROR = "internal error"

_STATUS = [
    (UnsupportedImage, 415),
    (ImageRejected, 422),
    (BadQuery, 422),
    (BadExamples, 422),
    (Conflict, 409),
    (NotIndexed, 404),
    (UnknownHead, 404),
    (IndexBusy, 409),
    (BackboneMismatch, 409),
    (LookalikeError, 400),
]


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: LookalikeError) -> JSONResponse:
        status = next(code for kind, code in _STATUS if isinstance(exc, kind))
        return JSONResponse({"detail": str(exc)}, status_code=status)

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server's log, never into the response.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": INTERNAL_ERROR}, status_code=500)

    app.add_exception_handler(LookalikeError, handle)
    app.add_exception_handler(Exception, internal)
