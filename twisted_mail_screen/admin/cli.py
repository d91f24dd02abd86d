# -*- test-case-name: tests.test_cli -*-
"""
The C{mailscreen} administration command.

    mailscreen [--config FILE] user add|passwd|del|list [ADDRESS]
    mailscreen [--config FILE] alias set ALIAS TARGET... | del ALIAS | list
    mailscreen [--config FILE] block list | add ADDR [--minutes N] | remove ADDR
    mailscreen [--config FILE] whitelist list | add ENTRY | remove ENTRY
    mailscreen [--config FILE] frozen list | freeze USER [--minutes N] | thaw USER
    mailscreen [--config FILE] queue list | flush | delete ID | hold ID | release ID
    mailscreen [--config FILE] faults list | add KIND [--match ...] | remove ID | clear
    mailscreen [--config FILE] quota show USER | set USER [--storage-mb N] [--messages N] [--default] | list
    mailscreen [--config FILE] dkim keygen DOMAIN [--selector S] [--algorithm rsa|ed25519] | show DOMAIN
    mailscreen check-config FILE

The block, whitelist, frozen and faults commands talk to the running server through
its control socket (C{control_socket}, by default C{control.sock} in the data
directory; C{--control-socket} overrides it) and take effect
at once.

Passwords are read from a prompt (twice) on a terminal, or from the first
line of standard input otherwise, never from the command line.
"""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
from typing import Callable, Sequence

from twisted_mail_screen.admin import dkim as dkim_cli, faults_cli, quota_cli
from twisted_mail_screen.runtime import control
from twisted_mail_screen.store.accounts import AccountError, AccountStore
from twisted_mail_screen.config.settings import Config, load_config
from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.runtime.tls import key_file_warning


class CommandError(Exception):
    """Ends the command with this message and exit status 1."""


def read_password(stdin=None) -> str:
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise CommandError("passwords do not match")
        password = first
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("empty password")
    return password


def _accounts(config: Config) -> AccountStore:
    return AccountStore(config.data_dir)


def cmd_user(args: argparse.Namespace, config: Config) -> None:
    accounts = _accounts(config)
    if args.action == "list":
        for address in sorted(accounts.users()):
            print(address)
        return
    if not args.address:
        raise CommandError(f"user {args.action} needs an ADDRESS")
    if args.action == "del":
        accounts.delete_user(args.address)
        print(f"deleted {args.address.lower()}")
        return
    domain = args.address.rpartition("@")[2].lower()
    if not config.test_host and domain not in config.domains:
        raise CommandError(f"{args.address}: {domain!r} is not one of the local domains "
                           f"({', '.join(config.domains)})")
    password = read_password()
    if args.action == "add":
        print(f"added {accounts.add_user(args.address, password)}")
    else:
        accounts.set_password(args.address, password)
        print(f"password changed for {args.address.lower()}")


def cmd_alias(args: argparse.Namespace, config: Config) -> None:
    accounts = _accounts(config)
    if args.action == "list":
        for name, targets in sorted(accounts.aliases().items()):
            print(f"{name}: {', '.join(targets)}")
    elif args.action == "set":
        if not args.name or not args.targets:
            raise CommandError("alias set needs ALIAS and at least one TARGET")
        accounts.set_alias(args.name, args.targets)
        print(f"{args.name.lower()}: {', '.join(t.lower() for t in args.targets)}")
    else:
        if not args.name:
            raise CommandError("alias del needs ALIAS")
        accounts.delete_alias(args.name)
        print(f"deleted alias {args.name.lower()}")


def _control(config: Config, command: str, **args: object) -> object:
    try:
        return control.call(config.control_socket, command, **args)
    except control.NotRunning as e:
        raise CommandError(f"no server is running on {config.data_dir} (no answer on {e}; "
                           "--control-socket or control_socket if it listens elsewhere); "
                           "start it, or edit the list files by hand (docs/screening.md)") from e
    except control.CommandError as e:
        raise CommandError(str(e)) from e


def _print_entries(entries: list[dict], empty: str, key: str) -> None:
    if not entries:
        print(empty)
    for e in entries:
        seconds = e["seconds_left"]
        left = "never expires" if seconds is None else f"{-(-seconds // 60)} min left"
        reason = f"  # {e['reason']}" if e["reason"] else ""
        print(f"{e[key]}  {e['expires'] or 'never'}  ({left}){reason}")


def _expiring(args: argparse.Namespace, config: Config, kind: str, target: str,
              add: str, remove: str, removed: str, empty: str) -> None:
    """list / add / remove on one of the server's expiring lists (blocks, freezes)."""
    if args.action == "list":
        _print_entries(_control(config, f"{kind}.list"), empty, target)  # type: ignore[arg-type]
        return
    value = getattr(args, target)
    if not value:
        raise CommandError(f"{kind} {args.action} needs {target.upper()}")
    if args.action == add:
        _print_entries([_control(config, f"{kind}.{add}", **{target: value},  # type: ignore[list-item]
                                 minutes=args.minutes, reason=args.reason)], "", target)
    else:
        _control(config, f"{kind}.{remove}", **{target: value})
        print(f"{removed} {value}")


def cmd_block(args: argparse.Namespace, config: Config) -> None:
    _expiring(args, config, "block", "address", "add", "remove", "unblocked", "no blocks")


def cmd_whitelist(args: argparse.Namespace, config: Config) -> None:
    if args.action == "list":
        for e in _control(config, "whitelist.list"):  # type: ignore[attr-defined]
            print(f"{e['entry']}  ({e['origin']})")
        return
    if not args.entry:
        raise CommandError(f"whitelist {args.action} needs an ENTRY")
    if args.action == "add":
        _control(config, "whitelist.add", entry=args.entry, comment=args.reason)
        print(f"whitelisted {args.entry}")
    else:
        _control(config, "whitelist.remove", entry=args.entry)
        print(f"removed {args.entry} from the white list")


def cmd_frozen(args: argparse.Namespace, config: Config) -> None:
    _expiring(args, config, "frozen", "user", "freeze", "thaw", "thawed", "no frozen accounts")


def cmd_faults(args: argparse.Namespace, config: Config) -> None:
    faults_cli.run_faults(args, lambda command, **kw: _control(config, command, **kw), CommandError)


def cmd_queue(args: argparse.Namespace, config: Config) -> None:
    """
    The outbound queue (docs/relay.md), through its files: a running
    server notices holds, releases, deletions and flushes within a second.
    """
    import os
    import time

    from twisted_mail_screen.relay.admin import format_queue
    from twisted_mail_screen.relay.spool import QueueDirectory

    queue = QueueDirectory(os.path.join(config.data_dir, "queue"))
    if args.action == "list":
        print(format_queue(queue.load_all(), queue.held(), time.time()), end="")
        return
    if args.action == "flush":
        queue.request_flush()
        print("flush requested: the running server retries every message not on hold")
        return
    if not args.id:
        raise CommandError(f"queue {args.action} needs a queue ID")
    queue_id = args.id.upper()
    if not getattr(queue, args.action)(queue_id):
        raise CommandError(f"{queue_id}: no such queued message"
                           + (" on hold" if args.action == "release" else ""))
    print({"delete": "deleted", "hold": "on hold", "release": "released"}[args.action]
          + f": {queue_id}")


def config_warnings(config: Config) -> list[str]:
    """What is valid but unsafe: secrets and mail readable by other local users."""
    warnings = []
    if config.tls.key is not None:
        warning = key_file_warning(config.tls.key)
        if warning:
            warnings.append(warning)
    try:
        mode = os.stat(config.data_dir).st_mode
    except OSError:
        mode = 0
    if mode & stat.S_IROTH:
        warnings.append(f"data_dir: {config.data_dir} is readable by others "
                        f"(mode {stat.S_IMODE(mode):o}); chmod o-rwx it")
    return warnings


def cmd_check_config(args: argparse.Namespace, config: Config | None) -> None:
    checked = load_config(args.file)
    for warning in config_warnings(checked):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.file}: ok (mode {checked.mode}, data_dir {checked.data_dir})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailscreen", description="Administer twisted-mail-screen.")
    parser.add_argument("--config", "-c", help="the server's TOML configuration file")
    parser.add_argument("--data-dir", "-d", help="the data directory (overrides the config)")
    parser.add_argument("--control-socket", help="the server's control socket (overrides the "
                        "config's control_socket; default DATA_DIR/control.sock)")
    sub = parser.add_subparsers(dest="command", required=True)

    user = sub.add_parser("user", help="accounts (password from a prompt or stdin)")
    user.add_argument("action", choices=("add", "passwd", "del", "list"))
    user.add_argument("address", nargs="?")
    user.set_defaults(run=cmd_user)

    alias = sub.add_parser("alias", help="aliases; '@domain' is the domain's catch-all")
    alias.add_argument("action", choices=("set", "del", "list"))
    alias.add_argument("name", nargs="?")
    alias.add_argument("targets", nargs="*")
    alias.set_defaults(run=cmd_alias)

    block = sub.add_parser("block", help="the block list of a running server")
    block.add_argument("action", choices=("list", "add", "remove"))
    block.add_argument("address", nargs="?", help="an IP address or network (CIDR)")
    block.add_argument("--minutes", type=int, default=None, help="default: until removed")
    block.add_argument("--reason", default="")
    block.set_defaults(run=cmd_block)

    white = sub.add_parser("whitelist", help="the run-time white list of a running server")
    white.add_argument("action", choices=("list", "add", "remove"))
    white.add_argument("entry", nargs="?", help="an IP, CIDR range or wildcard (192.168.*.*)")
    white.add_argument("--reason", default="")
    white.set_defaults(run=cmd_whitelist)

    frozen = sub.add_parser("frozen", help="frozen accounts of a running server")
    frozen.add_argument("action", choices=("list", "freeze", "thaw"))
    frozen.add_argument("user", nargs="?")
    frozen.add_argument("--minutes", type=int, default=None, help="default: [freeze] minutes")
    frozen.add_argument("--reason", default="")
    frozen.set_defaults(run=cmd_frozen)

    queue = sub.add_parser("queue", help="the outbound queue: list, flush, delete/hold/release ID")
    queue.add_argument("action", choices=("list", "flush", "delete", "hold", "release"))
    queue.add_argument("id", nargs="?", help="a queue ID, as 'queue list' shows it")
    queue.set_defaults(run=cmd_queue)

    faults_cli.add_parser(sub, cmd_faults)
    quota_cli.add_parser(sub, lambda args, config: quota_cli.run_quota(args, config, CommandError))
    dkim_cli.add_parser(sub, lambda args, config: dkim_cli.run_dkim(args, config, CommandError))

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(run=cmd_check_config, needs_config=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace, Config | None], None] = args.run
    try:
        config = None
        if getattr(args, "needs_config", True):
            overrides = {"data_dir": args.data_dir} if args.data_dir else {}
            if args.control_socket:
                overrides["control_socket"] = args.control_socket
            config = load_config(args.config, overrides)
        run(args, config)
    except ConfigError as e:
        print(f"mailscreen: configuration error: {e}", file=sys.stderr)
        return 1
    except (CommandError, AccountError) as e:
        print(f"mailscreen: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
