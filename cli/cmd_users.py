"""`synthperf users add|passwd|disable|enable|list`: local dashboard accounts.

Passwords are read from stdin (one line; prompted twice without echo on a terminal), never from
the command line, so they stay out of shell history and process lists. Example:

    printf '%s\\n' "$PASSWORD" | synthperf users add alice --role admin
"""

from __future__ import annotations

import argparse
import getpass
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("users", help="manage local dashboard accounts (roles: viewer, admin)")
    p.add_argument("--config", help="settings YAML (default: SYNTHPERF_CONFIG / environment)")
    act = p.add_subparsers(dest="users_action", required=True)
    a = act.add_parser("add", help="create an account; password from stdin")
    a.add_argument("name")
    a.add_argument("--role", choices=("viewer", "admin"), default="viewer")
    pw = act.add_parser("passwd", help="set an account's password; password from stdin")
    pw.add_argument("name")
    for verb in ("disable", "enable"):
        d = act.add_parser(verb, help=f"{verb} an account (takes effect on the next request)")
        d.add_argument("name")
    act.add_parser("list", help="list accounts")
    p.set_defaults(func=run)


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ValueError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def run(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from common.config import SettingsError, load_settings
    from common.jobstore.db import session_scope
    from common.jobstore.models import AuditEntry, User
    from common.jobstore.queries import init_db
    from service.api.auth import create_user, set_password

    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = settings.effective_database_url
    init_db(url)
    action = args.users_action
    try:
        with session_scope(url) as db:
            if action == "list":
                for u in db.scalars(select(User).order_by(User.username)):
                    state = "disabled" if u.disabled else "active"
                    print(f"{u.username}\t{u.role}\t{state}\tcreated {u.created:%Y-%m-%d %H:%M}")
                return 0
            if action == "add":
                create_user(db, args.name, _read_password(), args.role)
            elif action == "passwd":
                set_password(db, args.name, _read_password())
            else:
                user = db.scalar(select(User).where(User.username == args.name))
                if user is None:
                    raise ValueError(f"no user {args.name!r}")
                user.disabled = action == "disable"
            db.add(AuditEntry(user="cli", action=f"user_{action}", target=f"user:{args.name}",
                              detail={"role": args.role} if action == "add" else None))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"user {args.name}: {action} done")
    return 0
