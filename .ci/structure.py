#!/usr/bin/env python3
"""
The package's shape, checked by CI (and by tests/test_structure.py):

- no module of the package over 500 lines, no class over 400;
- no import cycle between the package's modules (imports inside functions
  count too: a cycle is a cycle whenever it closes);
- no private Twisted name: no import of a ``twisted.*._*`` module and no
  underscore attribute read off a Twisted object we do not own (checked as
  ``._name`` on names imported from ``twisted``, and the known internals);
- no private name of ours (``_name``) imported from another module of the package;
- every ``test-case-name`` header names a test module that exists.

Exit status 1 with one line per finding; 0 when the tree is clean.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "twisted_mail_screen"
MAX_LINES = 500
MAX_CLASS_LINES = 400
#: Twisted internals read by attribute before (issue 11); any comeback fails.
TWISTED_INTERNALS = ("_tempDataBuffer", "_writeDisconnected", "_proxyInfo", "_tlsConnection",
                     "_appSendBuffer", "_producer")
HEADER = re.compile(r"test-case-name:\s*([\w.]+)")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, tree: ast.AST, known: set[str]) -> set[str]:
    """The package modules C{name} imports (a package's __init__ is not followed)."""
    found = set()
    package = name if (ROOT / Path(*name.split("."))).is_dir() else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != name and not (ROOT / Path(*target.split("."))).is_dir():
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def private_twisted(path: Path, tree: ast.AST) -> list[str]:
    problems = []
    twisted_names = set()
    for node in ast.walk(tree):
        module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
        if module.startswith(PACKAGE):
            for alias in node.names:  # type: ignore[attr-defined]
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    problems.append(f"{path}:{node.lineno}: imports {alias.name}, private to {module}")
        elif isinstance(node, ast.ImportFrom) and (module == "twisted" or module.startswith("twisted.")):
            if any(part.startswith("_") for part in module.split(".")):
                problems.append(f"{path}:{node.lineno}: imports private module {node.module}")
            for alias in node.names:
                if alias.name.startswith("_"):
                    problems.append(f"{path}:{node.lineno}: imports private name {alias.name}")
                twisted_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("twisted") and any(p.startswith("_") for p in alias.name.split(".")):
                    problems.append(f"{path}:{node.lineno}: imports private module {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in twisted_names:
                problems.append(f"{path}:{node.lineno}: reads {owner.id}.{node.attr} (private to Twisted)")
            elif node.attr in TWISTED_INTERNALS and not (isinstance(owner, ast.Name) and owner.id == "self"):
                problems.append(f"{path}:{node.lineno}: reads .{node.attr} (a Twisted internal)")
    return problems


def check() -> list[str]:
    found = modules()
    known = set(found)
    graph: dict[str, set[str]] = {}
    problems: list[str] = []
    for name, path in found.items():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        lines = text.count("\n")
        if lines > MAX_LINES:
            problems.append(f"{rel}: {lines} lines (limit {MAX_LINES})")
        tree = ast.parse(text, str(rel))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    problems.append(f"{rel}:{node.lineno}: class {node.name} is {size} lines "
                                    f"(limit {MAX_CLASS_LINES})")
        graph[name] = imports(name, tree, known)
        problems += private_twisted(rel, tree)
        header = HEADER.search(text.split("\n", 1)[0])
        if header:
            test = ROOT / Path(*header.group(1).split(".")).with_suffix(".py")
            if not test.exists():
                problems.append(f"{rel}: test-case-name names {header.group(1)}, which does not exist")
    for component in cycles(graph):
        problems.append("import cycle: " + " <-> ".join(component))
    return problems


def main() -> int:
    problems = check()
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
