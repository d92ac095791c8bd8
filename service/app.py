"""The FastAPI application: one Library (database, model session, index) per process."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from indexer import __version__
from indexer.heads.teach import Trainings
from indexer.library import Library
from indexer.settings import Settings, get_settings
from service.auth import install_auth
from service.errors import install_error_handlers
from service.limits import BodySizeLimit
from service.routes import duplicates, heads, images, search, system, teaching, web

log = logging.getLogger("lookalike")


def warm_up(backbone) -> None:
    """One throwaway inference: it opens the model session, which the first real query would otherwise wait for."""
    size = backbone.preprocess.input_size
    backbone.embed(np.zeros((1, size, size, 3), dtype=np.uint8))


def _load_tags(library: Library) -> None:
    try:
        library.tag_index()
    except Exception:  # noqa: BLE001 - the first filtered query loads them again and reports why
        log.exception("loading the tag postings failed")


async def _watch_for_changes(library: Library, interval: float) -> None:
    """Serve what `lookalike index`, `heads train` or `tag` saved meanwhile, without a restart."""
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            changed = await run_in_threadpool(library.refresh)
        except Exception:  # noqa: BLE001 - a failed reload keeps serving the previous state
            log.exception("reloading the index failed; still serving the previous one")
            continue
        if changed:
            log.info("reloaded: %s", ", ".join(changed))


def create_app(settings: Settings | None = None, *, notify: Callable[[str], None] | None = None) -> FastAPI:
    settings = settings or get_settings()
    notify = notify or log.warning

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        library = Library(settings, notify=notify)
        # Load the model and the verified index once, before the first request.
        library.index()
        warm_up(library.backbone())
        # Tag postings load beside the first requests rather than before them (2-3 s at 1M
        # images): a filtered query that comes first waits for this load, not for one of its own.
        preload = threading.Thread(target=_load_tags, args=(library,), name="load-tags", daemon=True)
        preload.start()
        app.state.library = library
        app.state.trainings = Trainings(library, settings.train_inline_max)
        watcher = asyncio.create_task(_watch_for_changes(library, settings.reload_interval))
        try:
            yield
        finally:
            watcher.cancel()
            preload.join()  # it holds a database connection while it loads
            library.close()

    app = FastAPI(
        title="lookalike",
        version=__version__,
        description="Self-hosted visual similarity search: upload an image, get the indexed images that look like it.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    install_error_handlers(app)
    install_auth(app, settings.api_keys, settings.admin_keys)  # outermost: refused requests reach nothing
    app.include_router(search.router)
    app.include_router(images.router)
    app.include_router(heads.router)
    app.include_router(teaching.router)
    app.include_router(duplicates.router)
    app.include_router(system.router)
    app.include_router(web.router)
    return app
