"""The `lookalike` command: index folders, search, export, inspect and serve."""

from __future__ import annotations

import errno
import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from indexer.errors import LookalikeError
from indexer.settings import Settings

app = typer.Typer(help="lookalike: self-hosted visual similarity search.", no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")
heads_app = typer.Typer(help="Classification heads trained on the stored embeddings.", no_args_is_help=True)
app.add_typer(heads_app, name="heads")

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


_opened: list = []  # libraries this command opened: closed before the process ends


def _open(settings: Settings, *, batch: bool = False):
    from indexer.library import Library

    library = Library(settings, notify=lambda message: err.print(f"[yellow]note:[/] {message}"), batch=batch)
    _opened.append(library)
    return library


def _fail(message: str, hint: str | None = None) -> None:
    err.print(f"[red]error:[/] {escape(message)}")
    if hint:
        err.print(f"hint: {escape(hint)}")
    raise typer.Exit(1)


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What a full, read-only or forbidden disk raises (evaluated only when something was raised)."""
    from sqlalchemy.exc import OperationalError

    return (OSError, OperationalError)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _fail_storage(exc: BaseException, settings: Settings) -> None:
    """One line for a disk that refuses a write (no traceback), with what to do about it."""
    home = settings.resolved_home
    where = home
    if isinstance(exc, OSError):
        where = exc.filename or home
        target = exc.filename or f"in {home}"
        reason = exc.strerror or str(exc)
        verb = "cannot write" if exc.errno in _WRITE_ERRNOS else "I/O error on"
        code = exc.errno
    else:  # SQLite: "database or disk is full", "attempt to write a readonly database", ...
        from sqlalchemy.engine import make_url

        where = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
        target = f"the database {where}"
        reason = str(getattr(exc, "orig", exc)).splitlines()[0]
        verb = "cannot write"
        code = errno.ENOSPC if "full" in reason else errno.EACCES if "readonly" in reason else None
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some space on that disk and run the command again; what was committed before is kept"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"make {where} writable for this user (or use another --home) and run the command again"
    else:
        hint = "check the disk and run the command again; what was committed before is kept"
    _fail(f"{verb} {target}: {reason}", hint)


@app.command()
def index(
    folders: Annotated[list[Path], typer.Argument(help="Folders to index recursively")],
    home: HomeOption = None,
    backbone: BackboneOption = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per model call")] = None,
    workers: Annotated[int | None, typer.Option(help="Decoder processes (default: CPU cores)")] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Decode and embed on this Ray cluster: auto or HOST:PORT (a machine of the cluster) "
            "[env: LOOKALIKE_RAY_ADDRESS]",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Index image folders: add new files, re-embed changed ones, drop vanished ones."""
    settings = _settings(home, backbone=backbone, batch_size=batch_size, decode_workers=workers, ray_address=ray)
    if settings.ray_address:
        decoders = _cluster_decoders(settings, folders)
    else:
        # Decoders first: forked now, before the database and the model runtime exist in this
        # process, they decode and embed the first files while this one opens the home.
        from indexer.decode_worker import DecoderPool, decoder_count, prefetch_options

        decoders = DecoderPool(decoder_count(settings)).start()
        options = prefetch_options(settings)
        if options is not None:
            # Two batches: the start-up below takes one core for most of a second, which the
            # decoders would otherwise spend idle once the usual read-ahead is decoded.
            limit = max(decoders.read_ahead_files, 2 * settings.batch_size)
            decoders.prefetch(options, _first_files(folders), limit=limit)
    from indexer.pipeline import index_folders

    try:
        library = _open(settings, batch=True)
        with _progress_bar(quiet) as on_progress:
            report = index_folders(library, [str(f) for f in folders], progress=on_progress, decoders=decoders)
    except LookalikeError as exc:
        _fail(str(exc))
    except _storage_errors() as exc:
        _fail_storage(exc, settings)
    finally:
        decoders.close()  # already closed by a completed run
    for path, reason in report.failed:
        err.print(f"skipping {path}: {reason}", markup=False)
    rate = report.embedded / report.seconds if report.seconds else 0.0
    err.print(
        f"added {report.added}, updated {report.updated}, removed {report.removed}, "
        f"unchanged {report.unchanged}, failed {len(report.failed)}"
        + (f" (+{report.previously_failed} failed before, unchanged)" if report.previously_failed else "")
        + f" in {report.seconds:.1f} s ({rate:.1f} images/s embedded)"
    )


def _cluster_decoders(settings: Settings, folders: list[Path]):
    """Connect to the Ray cluster and check that every node sees the folders, or fail clearly."""
    from indexer.cluster import ClusterDecoders

    err.print(f"connecting to the Ray cluster at {settings.ray_address}")
    try:
        cluster = ClusterDecoders(
            settings.ray_address,
            [os.path.abspath(f) for f in folders],
            actors=settings.ray_actors,
            device=settings.device,
        )
    except LookalikeError as exc:
        _fail(str(exc))
    if cluster.note:
        err.print(f"note: {cluster.note}", markup=False)
    return cluster


def _first_files(folders: list[Path]):
    """Image files of the folders in scan order (the order a run decodes them), as decoder tasks."""
    from indexer.decode_worker import Task
    from indexer.scan import FoundFile, scan_folder

    for folder in folders:
        for item in scan_folder(str(folder)):
            if isinstance(item, FoundFile):
                yield Task(item.path, item.size, item.mtime_ns)


class _progress_bar:
    """A rich progress bar with images/s on stderr, or nothing when quiet or not a terminal."""

    def __init__(self, quiet: bool, what: str = "indexing"):
        self.enabled = not quiet
        self.progress = Progress(
            TextColumn(what),
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
    queries: Annotated[
        list[str] | None,
        typer.Argument(metavar="IMAGE_OR_ID...", help="Image files or ids of indexed images (several: examples)"),
    ] = None,
    like: Annotated[list[int] | None, typer.Option("--like", metavar="ID", help="Also like this indexed image")] = None,
    unlike: Annotated[
        list[int] | None, typer.Option("--unlike", metavar="ID", help="Unlike this indexed image (a negative example)")
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="Several examples: average (one averaged query) or best_score")
    ] = "average",
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=10000, help="Number of results")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Must have this tag (head:label or label)")] = None,
    any_tag: Annotated[list[str] | None, typer.Option("--any-tag", help="Must have at least one of these")] = None,
    not_tag: Annotated[list[str] | None, typer.Option("--not-tag", help="Must not have this tag")] = None,
    min_score: Annotated[float, typer.Option("--min-score", help="A tag counts from this score on")] = 0.0,
    exact: Annotated[
        bool, typer.Option("--exact", help="Scan every stored vector, even where an approximate index serves")
    ] = False,
    home: HomeOption = None,
) -> None:
    """Find the images most similar to the queries (and unlike --unlike), optionally only those
    with (or without) some tags. The query images themselves are left out."""
    from indexer.filters import TagFilter
    from indexer.search import Examples, search_examples

    tag_filter = TagFilter(tuple(tag or ()), tuple(any_tag or ()), tuple(not_tag or ()), min_score)
    uploads, positive = [], list(like or [])
    for query in queries or []:
        if Path(query).is_file():
            uploads.append(Path(query).read_bytes())
        elif query.isdigit():
            positive.append(int(query))
        else:
            _fail(f"{query} is neither an image file nor an image id")
    if not uploads and not positive and not unlike:
        _fail("give an image file or id to search by (or --unlike ID)")
    examples = Examples(tuple(positive), tuple(unlike or ()), tuple(uploads))
    try:
        library = _open(_settings(home))
        response = search_examples(library, examples, k, tag_filter, strategy=strategy, exact=exact)
    except LookalikeError as exc:
        _fail(str(exc))
    if as_json:
        out.print(json.dumps(response.to_json(), indent=2), markup=False)
        return
    for rank, result in enumerate(response.results, 1):
        tags = ", ".join(f"{t['head']}:{t['label']}" for t in result.tags)
        copy = "  (near-duplicate)" if result.near_duplicate else ""
        out.print(f"{rank:>3}  {result.score:.4f}  {result.path}{copy}" + (f"  [{tags}]" if tags else ""), markup=False)
    err.print(f"{len(response.results)} results in {response.took_ms:.1f} ms")


@app.command()
def export(
    out_file: Annotated[Path, typer.Argument(metavar="OUT", help="OUT.parquet or OUT.npz")],
    home: HomeOption = None,
) -> None:
    """Write id, absolute path, embedding and tags of every image (Parquet names its backbone)."""
    from indexer.export import export_embeddings

    try:
        count = export_embeddings(_open(_settings(home)), out_file)
    except LookalikeError as exc:
        _fail(str(exc))
    err.print(f"wrote {count} embeddings to {out_file}")


@app.command("import")
def import_(
    sources: Annotated[list[Path], typer.Argument(metavar="FILE_OR_FOLDER", help="Parquet files, or folders of them")],
    home: HomeOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
) -> None:
    """Add precomputed embeddings (Parquet, as `lookalike export` writes them): all rows or none."""
    from indexer.importer import import_embeddings

    settings = _settings(home)
    try:
        library = _open(settings, batch=True)
        with _progress_bar(quiet, "importing") as on_progress:
            report = import_embeddings(library, sources, progress=on_progress)
    except LookalikeError as exc:
        _fail(str(exc))
    except _storage_errors() as exc:
        _fail_storage(exc, settings)
    err.print(
        f"imported {report.added + report.updated} embeddings from {report.files} file(s): added {report.added}, "
        f"updated {report.updated}"
        + (f", kept {report.kept_local} indexed here from their files" if report.kept_local else "")
        + f" in {report.seconds:.1f} s"
    )


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
        f"images      {images['indexed']} indexed, {images['imported']} imported, {images['failed']} failed, "
        f"{images['total']} total",
        f"backbone    {info['backbone'] or '-'} (dimension {info['dimension'] or '-'})",
        f"index       {idx['type'] or '-'}, {idx['metric'] or '-'}, {idx['vectors']} vectors, "
        f"generation {idx['generation']}, {idx['bytes'] / 1e6:.1f} MB on disk, "
        f"{idx['memory_bytes'] / 1e6:.1f} MB in memory",
    ]
    if idx.get("exact") is False:
        lines.append(
            f"search      approximate: {idx['nprobe']} of {idx['nlist']} lists probed, "
            f"{idx['rerank']} candidates re-ranked exactly; "
            f"measured recall@10 {idx['recall_at_10']:.3f} (target {idx['recall_target']}, "
            f"{idx['recall_queries']} sampled queries); {idx['growing_segment']} added and {idx['tombstones']} "
            "removed since the last compaction"
        )
        if idx.get("compacting"):
            lines[-1] += "; compacting in the background now"
    elif idx.get("switch_at"):
        lines.append(f"search      exact; approximate from {idx['switch_at']} vectors on")
    out.print("\n".join(lines), markup=False)
    for failure in info["failures"]:
        out.print(f"failed      {failure['path']}: {failure['reason']}", markup=False)


@app.command()
def reindex(home: HomeOption = None) -> None:
    """Rebuild the FAISS index from the stored embeddings."""
    settings = _settings(home)
    try:
        index = _open(settings).rebuild_index()
    except LookalikeError as exc:
        _fail(str(exc))
    except _storage_errors() as exc:
        _fail_storage(exc, settings)
    err.print(f"rebuilt the index: {len(index)} vectors")


@app.command()
def maintain(home: HomeOption = None) -> None:
    """Fold new vectors and deletions into the approximate index now (compaction), or re-train it.

    Writers start this in the background when it is due; servers keep answering meanwhile and
    pick up the result by themselves."""
    from indexer import background_compaction

    settings = _settings(home)
    try:
        done = background_compaction.run(_open(settings), notify=lambda message: err.print(message))
    except LookalikeError as exc:
        _fail(str(exc))
    except _storage_errors() as exc:
        _fail_storage(exc, settings)
    err.print(f"maintenance: {done}")


WaitOption = Annotated[
    float, typer.Option("--wait", min=0, help="Seconds to wait for a running index or tag run to finish")
]


@app.command()
def backup(
    dest: Annotated[Path, typer.Argument(help="A new or empty folder for the backup")],
    home: HomeOption = None,
    wait: WaitOption = 300.0,
) -> None:
    """Snapshot the database and the index together (safe while serving or indexing)."""
    from indexer.backup import backup_home

    settings = _settings(home)
    try:
        info = backup_home(_open(settings), dest, wait=wait)
    except LookalikeError as exc:
        _fail(str(exc), "give --wait more seconds" if "being written" in str(exc) else None)
    except _storage_errors() as exc:
        _fail_storage(exc, settings)
    counts, index_info = info["counts"], info["index"]
    err.print(
        f"backed up {counts['images']} images ({counts['embeddings']} embeddings, {counts['heads']} heads, "
        f"{counts['tags']} tags) and an index of {index_info['vectors']} vectors "
        f"({index_info['source']}) to {Path(dest).resolve()}",
        markup=False,
    )


@app.command()
def restore(
    src: Annotated[Path, typer.Argument(help="A folder written by `lookalike backup`")],
    home: HomeOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a database that is not empty")] = False,
    wait: WaitOption = 300.0,
) -> None:
    """Restore a backup into this home (its database and index); the index is verified afterwards."""
    from indexer.backup import restore_home

    settings = _settings(home)
    try:
        result = restore_home(
            settings, src, force=force, wait=wait, notify=lambda m: err.print(f"[yellow]note:[/] {escape(m)}")
        )
    except LookalikeError as exc:
        _fail(str(exc))
    except _storage_errors() as exc:
        _fail_storage(exc, settings)
    err.print(
        f"restored {result['images']} images and an index of {result['vectors']} vectors "
        f"(generation {result['generation']}) into {settings.resolved_home}",
        markup=False,
    )


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
    _warn_about_keys(settings, host)
    uvicorn.run(application, host=host, port=port, log_level="warning")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well resolve to a public interface


def _warn_about_keys(settings: Settings, host: str) -> None:
    if settings.api_keys:
        admin = "admin keys for writes" if settings.admin_keys else "no admin keys: any API key may write"
        err.print(f"API keys required on every route but /health and the web page ({admin})")
        return
    err.print("no API keys are set (LOOKALIKE_API_KEYS): anyone who can reach this address can use the API")
    if not _is_loopback(host):
        err.print(
            f"[bold red]warning:[/] serving on {host}, which is not a loopback address, without API keys: "
            "every photo in the index, and its path, is readable from the network. "
            "Set LOOKALIKE_API_KEYS (and LOOKALIKE_ADMIN_KEYS), or bind to 127.0.0.1."
        )


@app.command()
def tag(
    head: Annotated[list[str] | None, typer.Option("--head", help="Only this head (repeatable)")] = None,
    home: HomeOption = None,
) -> None:
    """Re-tag every indexed image with every head (or the named ones)."""
    from indexer.heads.workflow import tag_all

    settings = _settings(home)
    try:
        with _progress_bar(False, "tagging") as on_progress:
            written = tag_all(_open(settings, batch=True), head or None, progress=on_progress)
    except LookalikeError as exc:
        _fail(str(exc))
    except _storage_errors() as exc:
        _fail_storage(exc, settings)
    err.print(f"wrote {written} tags")


@heads_app.command("train")
def heads_train(
    name: Annotated[str, typer.Argument(help="Name of the head (also its tag prefix)")],
    kind: Annotated[
        str | None, typer.Option("--type", help="binary, multiclass or multilabel (with --labels or --from-folders)")
    ] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV with header path,labels")] = None,
    root: Annotated[Path | None, typer.Option("--root", help="Base for relative paths in --labels")] = None,
    from_folders: Annotated[Path | None, typer.Option("--from-folders", help="Sub-folder name = class")] = None,
    negatives: Annotated[Path | None, typer.Option("--negatives", help="Binary: folder of negatives")] = None,
    positive: Annotated[str | None, typer.Option("--positive", help="Binary: the positive class")] = None,
    val_fraction: Annotated[float, typer.Option(help="Validation split")] = 0.2,
    folds: Annotated[
        int, typer.Option(help="k-fold cross-validation; 0: 5 folds below 2,000 examples, else one split; 1: one split")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    min_precision: Annotated[float | None, typer.Option(help="Thresholds reach this precision")] = None,
    min_confidence: Annotated[float, typer.Option(help="Multi-class: tag the top label only from here")] = 0.0,
    min_examples: Annotated[int, typer.Option(help="Labels with fewer examples are dropped")] = 5,
    index_new: Annotated[bool, typer.Option("--index", help="Also index labelled images not indexed yet")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    home: HomeOption = None,
) -> None:
    """Train a linear head on the stored embeddings and tag every indexed image with it.

    Without --labels or --from-folders, it trains on the head's stored examples (`heads examples`)."""
    from indexer.heads import labels as label_io
    from indexer.heads.model import HEAD_TYPES
    from indexer.heads.training import TrainOptions
    from indexer.heads.workflow import train

    if labels is None and from_folders is None:
        options = TrainOptions(val_fraction=val_fraction, folds=folds, seed=seed, min_precision=min_precision)
        _train_on_examples(name, options, as_json, home)
        return
    if kind not in HEAD_TYPES:
        _fail(f"--type must be one of {', '.join(HEAD_TYPES)}, not {kind!r}")
    if labels is not None and from_folders is not None:
        _fail("give one of --labels FILE.csv or --from-folders DIR, not both")
    warn = lambda m: err.print(f"[yellow]warning:[/] {m}")  # noqa: E731
    try:
        if labels is not None:
            label_set = label_io.read_csv(labels, kind, root=root)
        else:
            label_set = label_io.read_folders(from_folders, kind, negatives=negatives)
        label_set = label_io.finalise(label_set, positive=positive, min_examples=min_examples, warn=warn)
        options = TrainOptions(
            val_fraction=val_fraction,
            folds=folds,
            seed=seed,
            min_precision=min_precision,
            min_confidence=min_confidence,
        )
        library = _open(_settings(home))
        if index_new:
            from indexer.pipeline import index_files

            indexed = index_files(library, label_set.paths)
            err.print(f"indexed {indexed.added + indexed.updated} labelled images, {len(indexed.failed)} failed")
        result, report_dir, plots = train(library, name, label_set, options, log=lambda m: err.print(m))
    except LookalikeError as exc:
        _fail(str(exc))
    except _storage_errors() as exc:
        _fail_storage(exc, _settings(home))
    report = json.loads((report_dir / "report.json").read_text())
    if as_json:
        out.print(json.dumps(report, indent=2), markup=False)
    else:
        _print_metrics(report["metrics"])
    err.print(f"report in {report_dir}, plots in {plots}")


def _train_on_examples(name: str, options, as_json: bool, home: Path | None) -> None:
    from indexer.heads.teach import train_from_examples

    settings = _settings(home)
    try:
        library = _open(settings)
        with Progress(transient=True, console=err) as bar:
            task = bar.add_task("tagging", total=None)
            report = train_from_examples(
                library, name, options, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
    except LookalikeError as exc:
        _fail(str(exc))
    except _storage_errors() as exc:
        _fail_storage(exc, settings)
    for warning in report["warnings"]:
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    if as_json:
        out.print(json.dumps(report, indent=2), markup=False)
    else:
        _print_metrics(report["metrics"])
    seconds = report["seconds"]
    err.print(
        f"trained on {report['examples']} examples in {seconds['train']:.2f} s; tagged {report['tagged']} images "
        f"in {seconds['tag']:.2f} s; {len(report['mistakes'])} examples disagree with the head out of fold"
    )


def _image_ids(library, items: list[str]) -> list[int]:
    """Ids for image ids or paths of indexed images, in order."""
    from indexer import store

    ids = []
    with library.sessions() as session:
        for item in items:
            if Path(item).exists():
                found = store.image_id_for_path(session, str(Path(item).resolve()))
                if found is None:
                    _fail(f"{item} is not indexed")
                ids.append(found)
            elif item.lstrip("-").isdigit():
                ids.append(int(item))
            else:
                _fail(f"{item} is neither an indexed image nor an image id")
    return ids


@heads_app.command("examples")
def heads_examples(
    name: Annotated[str, typer.Argument(help="The head")],
    action: Annotated[str, typer.Argument(help="add, remove or list")],
    images: Annotated[
        list[str] | None, typer.Argument(metavar="[IMAGE_OR_ID]...", help="Indexed images (paths or ids)")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="add: the images' label (repeat for multi-label)")
    ] = None,
    labels_file: Annotated[
        Path | None, typer.Option("--labels", help="add: a label file (path,labels) of indexed images")
    ] = None,
    kind: Annotated[str | None, typer.Option("--type", help="add: binary, multiclass or multilabel")] = None,
    positive: Annotated[str | None, typer.Option("--positive", help="add: a binary head's positive label")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="list: print JSON")] = False,
    home: HomeOption = None,
) -> None:
    """The examples a head is taught from: add (or relabel), remove, list."""
    from indexer.heads.examples import get_examples, put_examples_batched, remove_example
    from indexer.heads.tagging import backbone_id_of

    if action not in ("add", "remove", "list"):
        _fail(f"the action is add, remove or list, not {action!r}")
    settings = _settings(home)
    try:
        library = _open(settings)
        if action == "list":
            with library.sessions() as session:
                found = get_examples(session, name)
            if as_json:
                out.print(json.dumps(found.to_json(), indent=2), markup=False)
                return
            counts = ", ".join(f"{label} {count}" for label, count in found.counts().items()) or "no examples"
            err.print(f"{name}: {found.kind}, {counts}")
            for image_id, labels in found.examples.items():
                out.print(f"{image_id:>8}  {'|'.join(labels)}", markup=False)
            return
        if action == "remove":
            ids = _image_ids(library, images or [])
            with library.sessions.begin() as session:
                for image_id in ids:
                    remove_example(session, name, image_id)
            err.print(f"removed {len(ids)} examples from {name!r}")
            return
        rows = _example_rows(library, images or [], label or [], labels_file, kind)
        backbone_id = backbone_id_of(library)
        with library.sessions.begin() as session:
            known = None
            try:
                known = get_examples(session, name).kind
            except LookalikeError:
                pass
            if kind is None and known is None:
                _fail("a new head needs --type binary, multiclass or multilabel")
            found = put_examples_batched(session, name, kind or known, rows, positive=positive, backbone_id=backbone_id)
        counts = ", ".join(f"{lbl} {n}" for lbl, n in found.counts().items())
        err.print(f"{name}: {len(rows)} examples set; now {counts}")
    except LookalikeError as exc:
        _fail(str(exc))
    except _storage_errors() as exc:
        _fail_storage(exc, settings)


def _example_rows(library, images: list[str], labels: list[str], labels_file: Path | None, kind: str | None):
    from indexer.heads import labels as label_io

    if labels_file is not None:
        if images or labels:
            _fail("give --labels FILE, or images with --label, not both")
        found = label_io.read_csv(labels_file, kind or "multilabel")
        return list(zip(_image_ids(library, found.paths), found.labels))
    if not images:
        _fail("add: give images (paths or ids) with --label, or --labels FILE")
    if not labels and kind != "multilabel":
        _fail("add: give the images' --label")
    return [(image_id, list(labels)) for image_id in _image_ids(library, images)]


@heads_app.command("suggest")
def heads_suggest(
    name: Annotated[str, typer.Argument(help="The head")],
    n: Annotated[int, typer.Option("-n", min=1, max=100, help="How many")] = 12,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    home: HomeOption = None,
) -> None:
    """The unlabelled images most worth labelling next for a head, each with its reason."""
    from indexer import store
    from indexer.heads.suggestions import suggestions_for

    try:
        library = _open(_settings(home))
        found = suggestions_for(library, name, n)
    except LookalikeError as exc:
        _fail(str(exc))
    if as_json:
        out.print(json.dumps({"suggestions": [s.to_json() for s in found]}, indent=2), markup=False)
        return
    with library.sessions() as session:
        rows = store.images_by_ids(session, [s.image_id for s in found])
    for item in found:
        row = rows.get(item.image_id)
        out.print(f"{item.image_id:>8}  {item.reason:<13}  {row.path if row else '?'}  ({item.detail})", markup=False)


@heads_app.command("versions")
def heads_versions(name: str, home: HomeOption = None) -> None:
    """Every training of a head; the current one is marked."""
    from indexer.heads.storage import head_row, versions_of

    try:
        library = _open(_settings(home))
        with library.sessions() as session:
            current = head_row(session, name).version
            for version in versions_of(session, name):
                mark = "*" if version.number == current else " "
                shown = version.metrics.get("metrics", {})
                figures = ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if isinstance(v, float))
                examples = version.metrics.get("examples")
                out.print(
                    f"{mark} {version.number:>3}  {version.created_at:%Y-%m-%d %H:%M}  {examples} examples  {figures}",
                    markup=False,
                )
    except LookalikeError as exc:
        _fail(str(exc))


@heads_app.command("activate")
def heads_activate(name: str, number: int, home: HomeOption = None) -> None:
    """Make version NUMBER of a head current again and re-tag the collection with it."""
    from indexer.heads.tagging import make_current

    try:
        tagged = make_current(_open(_settings(home)), name, number)
    except LookalikeError as exc:
        _fail(str(exc))
    err.print(f"head {name!r} is at version {number}; tagged {tagged} images")


def _print_metrics(metrics: dict) -> None:
    intervals = metrics.get("ci95") or {}
    for key, value in metrics.items():
        if key in ("confusion_matrix", "ap", "ci95"):
            continue
        text = f"{value:.4f}" if isinstance(value, float) else f"{value}"
        if intervals.get(key):
            low, high = intervals[key]
            text += f"  (95% CI {low:.4f}-{high:.4f})"
        out.print(f"{key:<20} {text}", markup=False)
    if "ap" in metrics:
        for label, ap in sorted(metrics["ap"].items(), key=lambda kv: -kv[1]):
            out.print(f"  AP {label:<16} {ap:.4f}", markup=False)
    if "confusion_matrix" in metrics:
        out.print("confusion matrix (rows: true, columns: predicted)", markup=False)
        for row in metrics["confusion_matrix"]:
            out.print("  " + " ".join(f"{v:>5}" for v in row), markup=False)


@heads_app.command("list")
def heads_list(home: HomeOption = None) -> None:
    """All heads with their type and number of labels."""
    from indexer.heads.storage import list_heads

    library = _open(_settings(home))
    with library.sessions() as session:
        for row in list_heads(session):
            note = " (built in)" if row.builtin else ""
            out.print(f"{row.name:<20} {row.kind:<11} {len(row.labels):>5} labels{note}", markup=False)


@heads_app.command("show")
def heads_show(name: str, home: HomeOption = None) -> None:
    """A head's labels, thresholds and metrics (JSON)."""
    from indexer.heads.workflow import head_report

    try:
        report = head_report(_open(_settings(home)), name)
    except LookalikeError as exc:
        _fail(str(exc))
    out.print(json.dumps(report, indent=2), markup=False)


@heads_app.command("eval")
def heads_eval(
    name: str,
    labels: Annotated[Path, typer.Option("--labels", help="CSV with header path,labels")],
    root: Annotated[Path | None, typer.Option("--root", help="Base for relative paths")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    home: HomeOption = None,
) -> None:
    """Evaluate a stored head on a label file, with its stored thresholds."""
    from indexer.heads import labels as label_io
    from indexer.heads.storage import head_row
    from indexer.heads.workflow import evaluate_head

    try:
        library = _open(_settings(home))
        with library.sessions() as session:
            kind = head_row(session, name).kind
        metrics = evaluate_head(library, name, label_io.read_csv(labels, kind, root=root))
    except LookalikeError as exc:
        _fail(str(exc))
    if as_json:
        out.print(json.dumps(metrics, indent=2), markup=False)
    else:
        _print_metrics(metrics)


@heads_app.command("delete")
def heads_delete(name: str, home: HomeOption = None) -> None:
    """Delete a head: its versions, its tags and its stored examples."""
    from indexer.heads.storage import delete_head

    try:
        library = _open(_settings(home))
        with library.sessions.begin() as session:
            delete_head(session, name)
        library.tags_changed()
    except LookalikeError as exc:
        _fail(str(exc))
    err.print(f"deleted head {name!r} with its versions, tags and examples")


@db_app.command("upgrade")
def db_upgrade(home: HomeOption = None) -> None:
    """Apply pending migrations (also done automatically on first use)."""
    from indexer.database import current_revision

    library = _open(_settings(home))
    err.print(f"database at revision {current_revision(library.engine)}")


def _add_duplicates() -> None:
    from cli_duplicates import app as duplicates_app

    app.add_typer(duplicates_app, name="duplicates")


_add_duplicates()


def main() -> None:
    # `kill -USR1 PID` prints where every thread of a running command is, to its stderr (a run
    # that seems stuck; the kill-point tests ask it of a command that outlives its timeout).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; what was committed is kept, the next run carries on")
        sys.exit(130)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            _exit_now(exc.code or 0)
        raise
    _exit_now(0)


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown.

    Everything a command writes is committed and fsynced before it returns (its databases are
    closed here, which empties SQLite's WAL); tearing down
    ONNX Runtime's thread pools and thousands of module objects then only costs time (~0.25 s,
    a twentieth of indexing 200 12-MP photos). Output and log buffers are flushed first."""
    import logging

    for library in _opened:
        library.close()  # SQLite: checkpoint and truncate the WAL, or the next process recovers it
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
