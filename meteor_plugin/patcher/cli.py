"""``meteor-plugin patch apply|check|revert PATH [--dry-run]``.

The project's CLI calls ``add_subparser(subparsers)``; the parsed arguments carry ``func=main``, and
``main(args)`` returns the exit status: 0 done (``check``: everything applied), 1 (``check`` only) not
everything applied, 2 refused or not a LLaVA/EAGLE tree.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import tree
from .recognise import NotACodebase

DESCRIPTION = (
    "Insert (apply), report (check) or remove (revert) the [METEOR] lines that make a LLaVA or EAGLE "
    "checkout's training, evaluation and demo entry points run with METEOR when given --meteor-config PATH "
    "or METEOR_CONFIG. PATH is the folder that holds llava/ or eagle/."
)


def add_subparser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("patch", help="patch a LLaVA or EAGLE checkout for METEOR", description=DESCRIPTION)
    configure(parser)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="patch_action", metavar="{apply,check,revert}")
    actions.required = True
    apply = actions.add_parser("apply", help="insert the [METEOR] lines (idempotent)")
    check = actions.add_parser("check", help="report, file by file, what is applied")
    revert = actions.add_parser("revert", help="remove the [METEOR] lines; files come back byte for byte")
    for sub in (apply, check, revert):
        sub.add_argument("path", metavar="PATH", help="the folder that holds llava/ or eagle/")
    for sub in (apply, revert):
        sub.add_argument("--dry-run", action="store_true", help="print the diff and change nothing")
    revert.add_argument("--force", action="store_true",
                        help="also revert files whose [METEOR] lines were edited by hand: removes the lines the "
                             "patcher inserts and marked lines calling meteor_plugin; a user's other [METEOR] "
                             "lines stay")
    parser.set_defaults(func=main)


def _print_survey(s: tree.Survey, out) -> None:
    layout = f", layout of {s.layout.title}" if s.layout else ""
    print(f"{s.root}: {s.codebase.title}{layout}", file=out)
    width = max(len(f.path) for f in s.files)
    for f in s.files:
        note = ""
        if f.status == tree.APPLIED:
            note = "(" + ", ".join(f.edits) + ")"
        elif f.status == tree.ABSENT:
            note = "(optional)"
        elif f.status == tree.REFUSED:
            note = f.problem
        print(f"  {f.status:<11}  {f.spec.role:<10}  {f.path:<{width}}  {note}".rstrip(), file=out)


def main(args: argparse.Namespace) -> int:
    out = sys.stdout
    try:
        if args.patch_action == "check":
            s = tree.check(args.path)
            _print_survey(s, out)
            done = len(s.with_status(tree.APPLIED))
            wanted = len([f for f in s.files if f.status != tree.ABSENT])
            print(f"METEOR patch: applied to {done} of {wanted} files", file=out)
            if s.with_status(tree.REFUSED):
                return 2
            return 0 if s.fully_applied else 1
        action = tree.apply if args.patch_action == "apply" else tree.revert
        kwargs = {"force": args.force} if args.patch_action == "revert" else {}
        outcome = action(args.path, dry_run=args.dry_run, **kwargs)
    except (tree.PatchError, NotACodebase) as exc:
        print(f"meteor-plugin patch {args.patch_action}: {exc}", file=sys.stderr)
        return 2
    verb = "patched" if args.patch_action == "apply" else "reverted"
    if args.dry_run:
        out.write(outcome.diff)
        print(f"dry run: would have {verb} {len(outcome.changed)} file(s)", file=sys.stderr)
    elif outcome.changed:
        print(f"{verb} {len(outcome.changed)} file(s) in {outcome.survey.root}:", file=out)
        for path in outcome.changed:
            print(f"  {path}", file=out)
    else:
        print(f"nothing to do: {'already applied' if args.patch_action == 'apply' else 'no [METEOR] lines'}", file=out)
    return 0


def run(argv: Optional[List[str]] = None) -> int:
    """Standalone use: ``python -m meteor_plugin.patcher apply|check|revert PATH``."""
    parser = argparse.ArgumentParser(prog="meteor-plugin patch", description=DESCRIPTION)
    configure(parser)
    return main(parser.parse_args(argv))
