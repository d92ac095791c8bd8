"""The `lookalike` command: index folders, search, export, inspect and serve."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from indexer.errors import LookalikeError
from indexer.settings import Settings

app = typer.Typer(help="lookalike: self-hosted visual similarity search.", no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

HomeOption = Annotated[
    Path | None, typer.Option("--home", help="Folder for the database and index [env: LOOKALIKE_HOME]")
]
BackboneOption = Annotated[str | None, typer.Option("--backbone", help="Embedding backbone [env: LOOKALIKE_BACKBONE]")]


def _settings(home: Path | None, **overrides) -> Settings:
    values = {key: value for key, value in overrides.items() if value is not None}
    if home is not None:
        values["home"] = home
    return Settings(**values)


def _open(settings: Settings):
    from indexer.library import Library

    return Library(settings, notify=lambda message: err.print(f"[yellow]note:[/] {message}"))


def _fail(message: str, hint: str | None = None) -> None:
    err.print(f"[red]error:[/] {message}")
    if hint:
        err.print(f"hint: {hint}")
    raise typer.Exit(1)


@app.command()
def index(
    folders: Annotated[list[Path], typer.Argument(help="Folders to index recursively")],
    home: HomeOption = None,
    backbone: BackboneOption = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per model call")] = None,
    workers: Annotated[int | None, typer.Option(help="Decoder processes (default: CPU cores)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Index image folders: add new files, re-embed changed ones, drop vanished ones."""
    from indexer.pipeline import index_folders

    settings = _settings(home, backbone=backbone, batch_size=batch_size, decode_workers=workers)
    try:
        library = _open(settings)
        with _progress_bar(quiet) as on_progress:
            report = index_folders(library, [str(f) for f in folders], progress=on_progress)
    except LookalikeError as exc:
        _fail(str(exc))
    for path, reason in report.failed:
        err.print(f"skipping {path}: {reason}", markup=False)
    rate = report.embedded / report.seconds if report.seconds else 0.0
    err.print(
        f"added {report.added}, updated {report.updated}, removed {report.removed}, "
        f"unchanged {report.unchanged}, failed {len(report.failed)}"
        + (f" (+{report.previously_failed} failed before, unchanged)" if report.previously_failed else "")
        + f" in {report.seconds:.1f} s ({rate:.1f} images/s embedded)"
    )


class _progress_bar:
    """A rich progress bar with images/s on stderr, or nothing when quiet or not a terminal."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet
        self.progress = Progress(
            TextColumn("indexing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        )
        self.task = None
        self.started = 0.0

    def __enter__(self):
        if not self.enabled:
            return None
        self.progress.start()
        self.started = time.perf_counter()
        return self.update

    def update(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("index", total=total, rate="")
        elapsed = time.perf_counter() - self.started
        rate = f"{done / elapsed:.1f} img/s" if elapsed > 0 and done else ""
        self.progress.update(self.task, completed=done, total=total, rate=rate)

    def __exit__(self, *exc_info):
        if self.enabled:
            self.progress.stop()
        return False


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="An image file, or the id of an indexed image")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=10000, help="Number of results")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    home: HomeOption = None,
) -> None:
    """Find the images most similar to QUERY."""
    from indexer.search import search_image, search_similar

    try:
        library = _open(_settings(home))
        if Path(query).is_file():
            response = search_image(library, Path(query).read_bytes(), k)
        elif query.isdigit():
            response = search_similar(library, int(query), k)
        else:
            _fail(f"{query} is neither an image file nor an image id")
    except LookalikeError as exc:
        _fail(str(exc))
    if as_json:
        out.print(json.dumps(response.to_json(), indent=2), markup=False)
        return
    for rank, result in enumerate(response.results, 1):
        out.print(f"{rank:>3}  {result.score:.4f}  {result.path}", markup=False)
    err.print(f"{len(response.results)} results in {response.took_ms:.1f} ms")


@app.command()
def export(
    out_file: Annotated[Path, typer.Argument(metavar="OUT", help="OUT.parquet or OUT.npz")],
    home: HomeOption = None,
) -> None:
    """Write id, absolute path and embedding of every indexed image."""
    from indexer.export import export_embeddings

    try:
        count = export_embeddings(_open(_settings(home)), out_file)
    except LookalikeError as exc:
        _fail(str(exc))
    err.print(f"wrote {count} embeddings to {out_file}")


@app.command()
def stats(
    home: HomeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Images by status, backbone, dimension, index type and size on disk."""
    from indexer.stats import collect_stats

    info = collect_stats(_open(_settings(home)))
    if as_json:
        out.print(json.dumps(info, indent=2), markup=False)
        return
    images, idx = info["images"], info["index"]
    lines = [
        f"home        {info['home']}",
        f"database    {info['database']}",
        f"images      {images['indexed']} indexed, {images['failed']} failed, {images['total']} total",
        f"backbone    {info['backbone'] or '-'} (dimension {info['dimension'] or '-'})",
        f"index       {idx['type'] or '-'}, {idx['metric'] or '-'}, {idx['vectors']} vectors, "
        f"generation {idx['generation']}, {idx['bytes'] / 1e6:.1f} MB on disk",
    ]
    out.print("\n".join(lines), markup=False)
    for failure in info["failures"]:
        out.print(f"failed      {failure['path']}: {failure['reason']}", markup=False)


@app.command()
def reindex(home: HomeOption = None) -> None:
    """Rebuild the FAISS index from the stored embeddings."""
    try:
        index = _open(_settings(home)).rebuild_index()
    except LookalikeError as exc:
        _fail(str(exc))
    err.print(f"rebuilt the index: {len(index)} vectors")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    home: HomeOption = None,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    import uvicorn

    from service.app import create_app

    settings = _settings(home)
    try:
        application = create_app(settings, notify=lambda m: err.print(f"[yellow]note:[/] {m}"))
    except LookalikeError as exc:
        _fail(str(exc))
    err.print(f"lookalike is serving {settings.resolved_home} at http://{host}:{port}/  (API docs: /docs)")
    uvicorn.run(application, host=host, port=port, log_level="warning")


@db_app.command("upgrade")
def db_upgrade(home: HomeOption = None) -> None:
    """Apply pending migrations (also done automatically on first use)."""
    from indexer.database import current_revision

    library = _open(_settings(home))
    err.print(f"database at revision {current_revision(library.engine)}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; what was committed is kept, the next run carries on")
        sys.exit(130)


if __name__ == "__main__":
    main()
