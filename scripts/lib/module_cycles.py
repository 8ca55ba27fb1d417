#!/usr/bin/env python3
"""Fails when the crate's top-level modules import each other in a cycle.

Reads every file under src/ (the binary's src/main.rs and src/cli/ excepted: they sit on top of
the library), maps it to its top-level module (src/delivery/log.rs -> delivery), collects the
`crate::name` paths it mentions outside comments and tests, and looks for strongly connected
components in that graph. Submodules of one module may refer to each other freely; a cycle
between two top-level modules is what makes a change ripple, and what this check refuses.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")


def module_of(path):
    rel = os.path.relpath(path, ROOT)
    parts = rel.split(os.sep)
    if parts[0] in ("main.rs", "lib.rs", "cli"):
        return None
    return parts[0][:-3] if parts[0].endswith(".rs") else parts[0]


def code_of(text):
    # Tests may use anything; comments and doc links are not dependencies.
    text = text.split("#[cfg(test)]")[0]
    text = re.sub(r"//[^\n]*", "", text)
    return text


def deps(text):
    found = set()
    for m in re.finditer(r"crate::(\{|\w+)", text):
        if m.group(1) != "{":
            found.add(m.group(1))
            continue
        # A use group: the first name of each top-level item, nested groups skipped.
        depth, item, i = 1, "", m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            if depth == 1 and c == ",":
                found.add(item.strip().split("::")[0].strip())
                item = ""
            elif depth == 1 or (depth == 0 and c != "}"):
                item += c
            i += 1
        found.add(item.strip().split("::")[0].strip())
    found.discard("")
    return found


def main():
    graph = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            mod = module_of(path)
            if mod is None:
                continue
            with open(path, encoding="utf-8") as fh:
                text = code_of(fh.read())
            graph.setdefault(mod, set()).update(d for d in deps(text) if d != mod)
    mods = set(graph)
    for m in graph:
        graph[m] &= mods
    # Tarjan's strongly connected components.
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in sccs if len(c) > 1]
    if "-v" in sys.argv:
        for m in sorted(graph):
            print(f"{m} -> {', '.join(sorted(graph[m])) or '-'}")
    if cycles:
        for c in cycles:
            members = set(c)
            edges = [f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in members]
            print("module cycle: " + ", ".join(c) + " (" + "; ".join(edges) + ")")
        sys.exit(1)
    print(f"no module cycles among {len(graph)} modules")


if __name__ == "__main__":
    main()
