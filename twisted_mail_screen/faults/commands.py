# -*- test-case-name: tests.test_fault_commands -*-
"""
The fault plan as commands: list, add, remove, clear, with JSON in and
out. The one implementation behind the web API (C{/api/v1/faults}), the
control channel (C{faults.*}) and so the C{mailscreen faults} command;
the pytest plugin calls the plan's own methods, which these wrap.

A rule added here takes the same fields as the Python method of its
kind (docs/faults.md): C{{"kind": "reject", "command": "RCPT",
"match": "*@bounce.test", "reply": "550 5.1.1 No such user", "times": 2}};
C{"times": null} applies it until cleared.
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted_mail_screen.faults.plan import FaultPlan

#: The kinds of rule and the method of the plan that adds each.
KINDS = ("reject", "tempfail", "delay", "disconnect", "fail_auth", "mailbox_full",
         "fail_delivery")


class UnknownRule(ValueError):
    """No active rule has this id (spent, removed, or never added)."""


class FaultCommands:
    """The plan's commands, each taking and returning JSON-ready values (reactor thread)."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan

    def list(self) -> list[dict[str, Any]]:
        """The active rules, oldest first, with their ids and remaining counts."""
        return [rule.as_dict() for rule in self.plan.rules()]

    def add(self, spec: dict[str, Any]) -> dict[str, Any]:
        """
        Add one rule: C{spec} holds its C{kind} and the arguments of the
        plan's method of that name.

        @raise ValueError: an unknown kind or argument, a missing one, or
            a value the plan refuses; the message names it.
        """
        if not isinstance(spec, dict):
            raise ValueError(f"a rule must be an object with a \"kind\", not {spec!r}")
        args = dict(spec)
        kind = args.pop("kind", None)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        method = getattr(self.plan, kind)
        try:
            inspect.signature(method).bind(**args)
        except TypeError as e:
            allowed = ", ".join(inspect.signature(method).parameters)
            raise ValueError(f"{kind}: {e} (it takes {allowed})") from e
        for name, value in args.items():
            if name not in ("times", "seconds") and value is not None and not isinstance(value, str):
                raise ValueError(f"{kind}: {name} must be a string, not {value!r}")
        return method(**args).as_dict()

    def remove(self, id: Any) -> bool:
        """
        Remove one rule.

        @raise UnknownRule: no active rule has this id.
        """
        if isinstance(id, bool) or not isinstance(id, int):
            raise ValueError(f"id must be an integer, not {id!r}")
        if not self.plan.remove(id):
            raise UnknownRule(f"no active fault rule with id {id} (spent or removed?)")
        return True

    def clear(self) -> int:
        """Remove every rule; how many there were."""
        count = len(self.plan.rules())
        self.plan.clear()
        return count


def register_fault_commands(control: Any, plan: FaultPlan) -> FaultCommands:
    """
    The C{faults.list/add/remove/clear} control commands (a test host
    only); C{faults.add} takes C{rule}, the object L{FaultCommands.add} takes.
    """
    commands = FaultCommands(plan)
    control.register("faults.list", commands.list)
    # The rule travels as one object: its "command" field would clash with the request's.
    control.register("faults.add", lambda rule: commands.add(rule))
    control.register("faults.remove", commands.remove)
    control.register("faults.clear", commands.clear)
    return commands
