#!/usr/bin/env python3
"""Checks that canaryd's modules import one way: no cycle among the files of src/, and none
among its top-level modules (folders and single-file modules).

An edge A -> B is any `crate::B...`, `super::...` or child-module (`child::...`) path in A's
code (its `use` lines and inline paths alike), resolved to the longest module path that exists; test modules at the
end of a file (`#[cfg(test)]` onwards) are left out, and so are a module's references to
itself. `mod child;` declarations are ownership, not imports.

    python3 .ci/imports.py            # prints the cycles, if any; exit 1 when there are
    python3 .ci/imports.py --graph    # also prints every module's imports
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*?)\}", re.S)


def module_of(path: Path) -> tuple:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts in (["lib"], ["main"]):
        return ()
    return tuple(parts)


def code_of(path: Path) -> str:
    text = path.read_text()
    cut = text.find("#[cfg(test)]")
    if cut >= 0:
        text = text[:cut]
    # Comments and doc comments name modules without importing them.
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def main() -> int:
    files = sorted(SRC.rglob("*.rs"))
    modules = {module_of(f): f for f in files}
    graph = {m: set() for m in modules}

    def resolve(start: tuple, segments: list) -> tuple:
        best = ()
        for i in range(len(segments) + 1):
            cand = start + tuple(segments[:i])
            if cand in modules:
                best = cand
        return best

    for mod, f in modules.items():
        code = code_of(f)
        # `use crate::a::{b, c::D}`: each item extends the prefix.
        paths = []
        for root, prefix, items in GROUP.findall(code):
            for item in re.split(r"[,\s]+", items):
                item = item.strip().split(" as ")[0].strip("{} ")
                if item and item != "self":
                    paths.append((root, prefix + "::" + item))
                elif item == "self":
                    paths.append((root, prefix))
        paths += PATH.findall(code)
        for root, rest in paths:
            segments = [s for s in rest.split("::") if s]
            if root == "crate":
                start = ()
            else:
                # `super` of a file module is its parent; of `a/mod.rs`, the crate's level above.
                start = mod[:-1]
                while segments and segments[0] == "super":
                    segments.pop(0)
                    start = start[:-1]
            target = resolve(start, segments)
            if target and target != mod:
                graph[mod].add(target)
        # A child module named by a relative path (`reader::parse`, `self::reader`).
        for child in modules:
            if len(child) == len(mod) + 1 and child[: len(mod)] == mod:
                if re.search(r"(?<!::)(?<![A-Za-z0-9_])(?:self::)?" + child[-1] + r"::", code):
                    graph[mod].add(child)

    def cycles(g: dict) -> list:
        found, state, stack = [], {}, []

        def visit(n):
            state[n] = 1
            stack.append(n)
            for m in sorted(g.get(n, ())):
                if state.get(m) == 1:
                    found.append(stack[stack.index(m):] + [m])
                elif m not in state:
                    visit(m)
            stack.pop()
            state[n] = 2

        for n in sorted(g):
            if n not in state:
                visit(n)
        return found

    name = lambda m: "::".join(m) or "crate"
    top = {}
    for m, targets in graph.items():
        if not m:
            continue
        top.setdefault(m[:1], set()).update(t[:1] for t in targets if t[:1] != m[:1])
    if "--graph" in sys.argv:
        for m in sorted(graph):
            print(f"{name(m)} -> {', '.join(name(t) for t in sorted(graph[m])) or '-'}")
    problems = [("file", c) for c in cycles(graph)] + [("top-level", c) for c in cycles(top)]
    for level, c in problems:
        print(f"import cycle ({level}): " + " -> ".join(name(m) for m in c))
    if not problems:
        print(f"no import cycles among {len(graph)} modules and {len(top)} top-level modules")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
