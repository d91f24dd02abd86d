# -*- test-case-name: tests.test_quota -*-
"""
C{mailscreen quota show USER | set USER [--storage-mb N] [--messages N]
[--default] | list}: accounts' limits and usage (docs/quota.md).

With the server running, through the control channel (C{quota.*}): the
change applies at once and usage comes from the server's own figures.
Without it, C{set} writes the limits file (read when the server starts)
and C{show} counts the Maildir itself.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.quota.state import (count_usage, limits_of, read_overrides, state_path,
                                              update_override)
from twisted_mail_screen.runtime import control
from twisted_mail_screen.store.addresses import AddressError, normalise_address
from twisted_mail_screen.store.maildir import MailStore


def add_parser(sub: Any, run: Callable[..., None]) -> None:
    quota = sub.add_parser("quota", help="accounts' storage and message limits, and their usage")
    quota.add_argument("action", choices=("show", "set", "list"))
    quota.add_argument("user", nargs="?", help="the account's address")
    quota.add_argument("--storage-mb", type=int, default=None, help="storage limit in MiB (0: none)")
    quota.add_argument("--messages", type=int, default=None, help="message count limit (0: none)")
    quota.add_argument("--default", action="store_true",
                       help="set: drop the account's own limits ([quota] applies again)")
    quota.set_defaults(run=run)


def _limit(value: int | None, unit: str) -> str:
    return f"{value} {unit}".strip() if value else "unlimited"


def describe(report: dict[str, Any]) -> str:
    s, m = report["storage"], report["messages"]
    own = lambda r: "" if r["own_limit"] else " (default)"  # noqa: E731
    return (f"{report['account']}: storage {s['used_kib']} KiB of {_limit(s['limit_kib'], 'KiB')}"
            f"{own(s)}, messages {m['used']} of {_limit(m['limit'], '')}{own(m)}")


def _offline_report(config: Config, user: str) -> dict[str, Any]:
    overrides = read_overrides(state_path(config.data_dir))
    own = overrides.get(user, {})
    limits = limits_of(own, config.quota.default)
    usage = count_usage(MailStore(os.path.join(config.data_dir, "mail")).maildir(user).path)
    return {"account": user,
            "storage": {"used_kib": usage.kib, "used_octets": usage.octets,
                        "limit_kib": limits.storage_kib or None, "own_limit": "storage_kib" in own},
            "messages": {"used": usage.messages, "limit": limits.messages or None,
                         "own_limit": "messages" in own}}


def run_quota(args: argparse.Namespace, config: Config, error: type[Exception]) -> None:
    def call(command: str, **kw: Any) -> Any:
        try:
            return control.call(config.control_socket, command, **kw)
        except control.CommandError as e:
            raise error(str(e)) from e

    if args.action == "list":
        try:
            reports = call("quota.list")
        except control.NotRunning as e:
            raise error(f"no server is running on {config.data_dir} (no answer on {e}): "
                        "quota list needs it; quota show USER works without") from e
        for report in reports:
            print(describe(report))
        return
    if not args.user:
        raise error(f"quota {args.action} needs a USER")
    try:
        user = normalise_address(args.user)
    except AddressError as e:
        raise error(f"{args.user}: {e}") from e
    if args.action == "show":
        try:
            print(describe(call("quota.show", user=user)))
        except control.NotRunning:
            print(describe(_offline_report(config, user)))
        return
    changes: dict[str, Any] = {}
    if args.storage_mb is not None:
        changes["storage_kib"] = args.storage_mb * 1024
    if args.messages is not None:
        changes["messages"] = args.messages
    if not changes and not args.default:
        raise error("quota set needs --storage-mb, --messages or --default")
    try:
        print(describe(call("quota.set", user=user, default=args.default, **changes)))
    except control.NotRunning:
        local = {"storage_kib": None, "messages": None} if args.default else {}
        try:
            update_override(state_path(config.data_dir), user, {**local, **changes})
        except ValueError as e:
            raise error(str(e)) from e
        print(describe(_offline_report(config, user)) + "  (no server running: applies when it starts)")
