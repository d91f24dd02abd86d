# -*- test-case-name: tests.test_cli -*-
"""
The C{mailscreen} administration command.

    mailscreen [--config FILE] user add|passwd|del|list [ADDRESS]
    mailscreen [--config FILE] alias set ALIAS TARGET... | del ALIAS | list
    mailscreen check-config FILE

Passwords are read from a prompt (twice) on a terminal, or from the first
line of standard input otherwise, never from the command line.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Callable, Sequence

from twisted_mail_screen.accounts import AccountError, AccountStore
from twisted_mail_screen.config import Config, load_config
from twisted_mail_screen.configbase import ConfigError


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


def cmd_check_config(args: argparse.Namespace, config: Config | None) -> None:
    checked = load_config(args.file)
    print(f"{args.file}: ok (mode {checked.mode}, data_dir {checked.data_dir})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailscreen", description="Administer twisted-mail-screen.")
    parser.add_argument("--config", "-c", help="the server's TOML configuration file")
    parser.add_argument("--data-dir", "-d", help="the data directory (overrides the config)")
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
