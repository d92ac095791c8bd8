"""`lookalike duplicates`: list groups by tier, record decisions, plan, apply and undo removals."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

import cli
from indexer.errors import IndexBusy, LookalikeError

app = typer.Typer(
    help="Duplicates across the collection: identical files, copies of one frame, near-duplicates of one scene.",
    invoke_without_command=True,
)

TierOption = Annotated[str, typer.Option("--tier", help="identical, copy (includes identical) or near (all)")]
PreferOption = Annotated[
    list[Path] | None, typer.Option("--prefer", help="Keep rule: prefer members under this folder (repeatable)")
]


def _scan(library, quiet: bool = False) -> None:
    """Bring the stored links up to date (the first time: the whole collection, with progress)."""
    from indexer.duplicates import scan

    with library.sessions() as session:
        pending = scan.pending_images(session).ids
    if not len(pending):
        return
    try:
        with library.write_lock(), cli._progress_bar(quiet or len(pending) < 1000, "duplicate scan") as bar:
            report = scan.update(library, progress=(lambda stage, done, total: bar(done, total)) if bar else _quiet)
    except IndexBusy as exc:
        cli.err.print(f"[yellow]note:[/] {escape(str(exc))}; listing the links found so far")
        return
    if report.checked >= 1000:
        cli.err.print(f"checked {report.checked} images in {report.seconds:.1f} s")


def _quiet(*_) -> None:
    pass


@app.callback()
def duplicates(
    ctx: typer.Context,
    tier: TierOption = "near",
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Only copy/near links scoring this or more")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV, one row per member")] = False,
    folder: Annotated[Path | None, typer.Option("--folder", help="Only groups with a member under this folder")] = None,
    prefer: PreferOption = None,
    resolved: Annotated[bool, typer.Option("--resolved", help="Also groups resolved by a keep choice")] = False,
    home: cli.HomeOption = None,
) -> None:
    """List duplicate groups, largest first, with the member each group's keep rule picks."""
    if ctx.invoked_subcommand is not None:
        return
    from indexer.duplicates.groups import check_tier, list_groups

    try:
        check_tier(tier)
        library = cli._open(cli._settings(home))
        _scan(library, quiet=as_json or as_csv)
        with library.sessions() as session:
            groups = list_groups(
                session,
                tier,
                min_score=min_score,
                folder=str(folder) if folder else None,
                prefer=tuple(str(p) for p in prefer or ()),
                include_resolved=resolved,
            )
    except LookalikeError as exc:
        cli._fail(str(exc))
    if as_json:
        print(json.dumps({"tier": tier, "groups": [g.to_json() for g in groups]}, indent=2))
        return
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["group", "tier", "id", "path", "size", "width", "height", "format", "keep", "keep_reason"])
        for n, g in enumerate(groups, 1):
            for m in g.members:
                writer.writerow(
                    [
                        n,
                        g.tier,
                        m.id,
                        m.path,
                        m.size,
                        m.width,
                        m.height,
                        m.format,
                        m.keep,
                        g.keep_reason if m.keep else "",
                    ]
                )
        return
    if not groups:
        cli.out.print(f"no duplicate groups at tier {tier}")
        return
    for n, g in enumerate(groups, 1):
        scores = ", ".join(f"{link.a}-{link.b} {link.tier} {link.score:.3f}" for link in g.links[:6])
        more = f" (+{len(g.links) - 6} links)" if len(g.links) > 6 else ""
        cli.out.print(f"[bold]group {n}[/]: {g.tier}, {len(g.members)} images; links {scores}{more}")
        for m in g.members:
            size = f"{m.width}x{m.height}" if m.width else "?"
            mark = f"[green]keep[/] ({escape(g.keep_reason)})" if m.keep else ""
            cli.out.print(f"  {m.id:>8}  {escape(m.path)}  {m.size:,} B  {size}  {m.format or '?'}  {mark}")
    cli.err.print(f"{len(groups)} groups")


@app.command("scan")
def scan_command(
    full: Annotated[bool, typer.Option("--full", help="Forget the stored links and compare every image again")] = False,
    home: cli.HomeOption = None,
) -> None:
    """Compare the images not checked yet (all of them with --full) with the collection."""
    from indexer.duplicates import scan

    try:
        library = cli._open(cli._settings(home))
        if full:
            with library.write_lock(), library.sessions.begin() as session:
                scan.forget(session)
        _scan(library)
    except LookalikeError as exc:
        cli._fail(str(exc))


@app.command("distinct")
def distinct_command(
    images: Annotated[list[int], typer.Argument(help="Two or more image ids that are not duplicates")],
    home: cli.HomeOption = None,
) -> None:
    """Mark images as not duplicates of one another; their links are ignored from now on."""
    from indexer.duplicates.decisions import mark_distinct

    try:
        library = cli._open(cli._settings(home))
        with library.sessions.begin() as session:
            added = mark_distinct(session, images)
    except LookalikeError as exc:
        cli._fail(str(exc))
    cli.err.print(f"{added} pairs marked as not duplicates")


@app.command("keep")
def keep_command(
    image: Annotated[int, typer.Argument(help="The image id to keep of its group")],
    tier: TierOption = "near",
    home: cli.HomeOption = None,
) -> None:
    """Choose which member of a group to keep; the group counts as resolved until a new member joins."""
    from indexer.duplicates.decisions import choose_keep

    try:
        library = cli._open(cli._settings(home))
        with library.sessions.begin() as session:
            group = choose_keep(session, image, tier)
    except LookalikeError as exc:
        cli._fail(str(exc))
    cli.err.print(f"keeping {image} of a group of {len(group.members)}")


@app.command("plan")
def plan_command(
    out: Annotated[Path, typer.Argument(help="Where to write the plan: .json or .csv")],
    tier: TierOption = "copy",
    folder: Annotated[Path | None, typer.Option("--folder", help="Only groups with a member under this folder")] = None,
    prefer: PreferOption = None,
    home: cli.HomeOption = None,
) -> None:
    """Write which files would be removed and why; nothing is touched."""
    from indexer.duplicates import plan
    from indexer.duplicates.groups import check_tier

    try:
        check_tier(tier)
        library = cli._open(cli._settings(home))
        _scan(library)
        with library.sessions() as session:
            removals = plan.plan(
                session, tier, folder=str(folder) if folder else None, prefer=tuple(str(p) for p in prefer or ())
            )
        plan.write_plan(removals, out, tier)
    except LookalikeError as exc:
        cli._fail(str(exc))
    cli.err.print(
        f"{len(removals)} files would be removed; see {out}. Nothing was moved: "
        f"`lookalike duplicates apply {out} --move-to DIR`"
    )


@app.command("apply")
def apply_command(
    plan_file: Annotated[Path, typer.Argument(help="A plan written by `lookalike duplicates plan`")],
    move_to: Annotated[Path, typer.Option("--move-to", help="Quarantine folder the removed files move into")],
    merge_tags: Annotated[
        bool, typer.Option("--merge-tags", help="Give the kept image the removed ones' tags it lacks")
    ] = False,
    home: cli.HomeOption = None,
) -> None:
    """Move the plan's files into quarantine (relative paths kept), update the index, write an undo log."""
    from indexer.duplicates import plan

    try:
        library = cli._open(cli._settings(home))
        report = plan.apply_plan(library, plan.read_plan(plan_file), move_to, merge_tags=merge_tags)
    except LookalikeError as exc:
        cli._fail(str(exc))
    for path, why in report.skipped:
        cli.err.print(f"skipped {path}: {why}", markup=False)
    cli.err.print(f"moved {len(report.moved)} files into {move_to}; undo with `lookalike duplicates undo {report.log}`")
    if merge_tags:
        cli.err.print(f"{report.tags_merged} tags carried over to the kept images")


@app.command("undo")
def undo_command(
    log: Annotated[Path, typer.Argument(help="The undo log `apply` wrote")],
    home: cli.HomeOption = None,
) -> None:
    """Put the files an apply moved back where they were, and index them again."""
    from indexer.duplicates import plan

    try:
        library = cli._open(cli._settings(home))
        restored, skipped = plan.undo(library, log)
    except LookalikeError as exc:
        cli._fail(str(exc))
    for path, why in skipped:
        cli.err.print(f"skipped {path}: {why}", markup=False)
    cli.err.print(f"put back {len(restored)} files")
