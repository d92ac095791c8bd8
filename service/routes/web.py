"""The web page: `/` and its static files (app.js and its modules in js/), shipped in the package.

No build step, no CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Only these names are served: a fixed table, so no request path ever reaches the file system.
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    # The page's ES modules, imported by app.js: the files of static/js/ when the server starts.
    **{f"js/{path.name}": "text/javascript; charset=utf-8" for path in sorted((STATIC_DIR / "js").glob("*.js"))},
}

# Everything the page needs comes from this server; images may be blob: URLs (API keys) or data:.
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=FileResponse)
def index_page():
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff"},
    )


@router.get("/favicon.ico", response_class=FileResponse)
def favicon():
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "no-cache"})


@router.get("/static/{name:path}", response_class=FileResponse)
def static_asset(name: str):
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail="Not Found")
    return FileResponse(
        STATIC_DIR / name,
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
