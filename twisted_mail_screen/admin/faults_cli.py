# -*- test-case-name: tests.test_fault_commands -*-
"""
C{mailscreen faults list | add KIND [options] | remove ID | clear}: the
fault plan of a running test host (docs/faults.md), through the control
channel's C{faults.*} commands (L{twisted_mail_screen.faults.commands}).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from twisted_mail_screen.faults.commands import KINDS

#: The options of C{faults add}: each is the argument of the same name of the plan's methods.
OPTIONS = ("command", "match", "reply", "seconds", "after", "user", "address")


def add_parser(sub: Any, run: Callable[..., None]) -> None:
    faults = sub.add_parser("faults", help="injected faults of a running test host (docs/faults.md)")
    faults.add_argument("action", choices=("list", "add", "remove", "clear"))
    faults.add_argument("what", nargs="?", help="add: the KIND (" + ", ".join(KINDS)
                        + "); remove: the rule's ID")
    for name in OPTIONS:
        faults.add_argument(f"--{name}", type=float if name == "seconds" else str, default=None)
    faults.add_argument("--times", default=None,
                        help="how many times the rule applies (default 1); 'forever': until cleared")
    faults.set_defaults(run=run)


def describe(rule: dict[str, Any]) -> str:
    """One line a rule: id, kind, command, what it matches and says, what is left."""
    parts = [f"{rule['id']}", rule["kind"], rule["command"]]
    if rule.get("match") is not None:
        parts.append(f"match={rule['match']}")
    if rule.get("reply") is not None:
        parts.append(f"reply={rule['reply']!r}")
    if rule["kind"] == "delay":
        parts.append(f"seconds={rule['seconds']:g}")
    left = rule.get("remaining")
    parts.append("until cleared" if left is None else f"{left} left")
    return "  ".join(parts)


def run_faults(args: argparse.Namespace, control: Callable[..., Any],
               error: type[Exception]) -> None:
    """Carry out C{args}; C{control(command, **args)} calls the server, C{error} ends with a message."""
    ask = control

    def control(name: str, **kw: Any) -> Any:
        try:
            return ask(name, **kw)
        except error as e:
            # A site registers no faults.* command: say why, not "bad request".
            if str(e) == f"bad request: {name!r}":
                raise error("faults exist only on a test host: this server has no fault plan "
                            "(docs/faults.md)") from e
            raise

    if args.action == "list":
        rules = control("faults.list")
        print("\n".join(describe(r) for r in rules) if rules else "no fault rules")
    elif args.action == "clear":
        print(f"removed {control('faults.clear')} fault rule(s)")
    elif args.action == "remove":
        if not args.what or not args.what.isdigit():
            raise error("faults remove needs the rule's ID (a number, as 'faults list' shows)")
        control("faults.remove", id=int(args.what))
        print(f"removed fault rule {args.what}")
    else:
        if not args.what:
            raise error("faults add needs a KIND: " + ", ".join(KINDS))
        spec: dict[str, Any] = {name: getattr(args, name) for name in OPTIONS
                                if getattr(args, name) is not None}
        if args.times is not None:
            spec["times"] = _times(args.times, error)
        print(describe(control("faults.add", rule={"kind": args.what, **spec})))


def _times(text: str, error: type[Exception]) -> int | None:
    if text.lower() == "forever":
        return None
    try:
        return int(text)
    except ValueError:
        raise error(f"--times must be a positive number or 'forever', not {text!r}") from None
