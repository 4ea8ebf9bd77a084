"""The store's CLI subcommands: runs, export, import, delete (wired into cli.py).

Each handler takes the parsed arguments and returns an exit code: 0 on success, 2 with one line
on stderr (the problem and the fix) for bad input such as an unknown run id, a corrupt file or an
unreachable database.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd

from store.db import ENV_VAR, open_store
from store.errors import StoreError
from store.portable import delete_run, export_run, import_run
from store.reader import RunReader

EXIT_BAD_INPUT = 2


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="URL", default=None,
                        help=f"SQLAlchemy database URL (default: ${ENV_VAR}, else "
                             "sqlite:///data/kvlab.db in the project)")


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    runs = subparsers.add_parser("runs", help="list stored runs, newest first")
    runs.add_argument("--json", action="store_true",
                      help="print a JSON array of {run_id, name, status, steps, created, "
                           "imported}")
    runs.add_argument("--status", choices=("running", "finished", "failed", "interrupted"))
    runs.add_argument("--limit", type=int, help="show at most this many runs")
    add_db_argument(runs)
    runs.set_defaults(handler=_guarded(cmd_runs))

    export = subparsers.add_parser("export", help="write one run to a portable trace file")
    export.add_argument("run_id", type=int, metavar="RUN_ID")
    export.add_argument("file", metavar="FILE", help="e.g. run-7.kvtrace.zip")
    add_db_argument(export)
    export.set_defaults(handler=_guarded(cmd_export))

    imp = subparsers.add_parser("import", help="add a run from a trace file; prints its new id")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--copy", action="store_true",
                     help="import even if this file was imported before (a second, identical run)")
    add_db_argument(imp)
    imp.set_defaults(handler=_guarded(cmd_import))

    remove = subparsers.add_parser("delete", help="delete a run and all its rows")
    remove.add_argument("run_id", type=int, metavar="RUN_ID")
    add_db_argument(remove)
    remove.set_defaults(handler=_guarded(cmd_delete))


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    run.__doc__ = handler.__doc__
    return run


@contextmanager
def _store_for(args: argparse.Namespace) -> Iterator:
    """The store named by --db, closed again when the command is done."""
    store = open_store(args.db)
    try:
        yield store
    finally:
        store.dispose()


def cmd_runs(args: argparse.Namespace) -> int:
    with _store_for(args) as store:
        df = RunReader(store).list_runs(status=args.status, limit=args.limit)
    rows = [{"run_id": int(r.run_id), "name": None if pd.isna(r.name) else r.name,
             "status": r.status,
             "steps": int(r.num_steps), "created": r.created_at.isoformat(timespec="seconds"),
             "imported": bool(r.imported)}
            for r in df.itertuples()]
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no runs yet; record one with `python cli.py run ... --db URL`")
        return 0
    print(f"{'id':>5}  {'status':<11}  {'steps':>7}  {'created (UTC)':<19}  name")
    for r in rows:
        mark = " (imported)" if r["imported"] else ""
        print(f"{r['run_id']:>5}  {r['status']:<11}  {r['steps']:>7}  {r['created']:<19}  "
              f"{r['name'] or ''}{mark}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _store_for(args) as store:
        path = export_run(store, args.run_id, args.file)
    print(f"exported run {args.run_id} to {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with _store_for(args) as store:
        run_id = import_run(store, args.file, allow_copy=args.copy)
    print(f"run id: {run_id}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _store_for(args) as store:
        delete_run(store, args.run_id)
    print(f"deleted run {args.run_id}")
    return 0
