"""The FastAPI application: one Library (database, model session, index) per process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI

from indexer import __version__
from indexer.library import Library
from indexer.settings import Settings, get_settings
from service.errors import install_error_handlers
from service.limits import BodySizeLimit
from service.routes import heads, images, search, system

log = logging.getLogger("lookalike")


def warm_up(backbone) -> None:
    """One throwaway inference so the first real query does not pay ONNX Runtime's lazy set-up."""
    size = backbone.preprocess.input_size
    backbone.embed(np.zeros((1, size, size, 3), dtype=np.uint8))


def create_app(settings: Settings | None = None, *, notify: Callable[[str], None] | None = None) -> FastAPI:
    settings = settings or get_settings()
    notify = notify or log.warning

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        library = Library(settings, notify=notify)
        # Load the model and the verified index once, before the first request.
        library.index()
        warm_up(library.backbone())
        app.state.library = library
        try:
            yield
        finally:
            library.close()

    app = FastAPI(
        title="lookalike",
        version=__version__,
        description="Self-hosted visual similarity search: upload an image, get the indexed images that look like it.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    install_error_handlers(app)
    app.include_router(search.router)
    app.include_router(images.router)
    app.include_router(heads.router)
    app.include_router(system.router)
    return app
