#!/usr/bin/env python3
"""Fails when the crate's modules import each other in a cycle.

Reads every file under src/ (the binary's src/main.rs and src/cli/ excepted: they sit on top of
the library) and maps it to its module: the top-level module (src/scheduler/index.rs ->
scheduler), or, inside a folder that only groups modules by stage (a mod.rs of docs and `pub mod`
lines, like src/outbound/), the module one level down (src/outbound/delivery/lane.rs ->
outbound::delivery). It collects the `crate::` paths each file mentions outside comments and
tests, and looks for strongly connected components in that graph. Submodules of one module may
refer to each other freely; a cycle between two modules is what makes a change ripple, and what
this check refuses.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")


def is_group(name):
    """A folder whose mod.rs holds nothing but docs and `pub mod x;` lines."""
    path = os.path.join(ROOT, name, "mod.rs")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("//") and not re.fullmatch(r"pub mod \w+;", line):
                return False
    return True


GROUPS = {d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)) and is_group(d)}


def unit(segments):
    """The module a path (or a file's path under src/, without extensions) belongs to."""
    if not segments:
        return None
    if segments[0] in GROUPS:
        return "::".join(segments[:2]) if len(segments) > 1 else None
    return segments[0]


def module_of(path):
    rel = os.path.relpath(path, ROOT)
    parts = rel.split(os.sep)
    if parts[0] in ("main.rs", "lib.rs", "cli"):
        return None
    parts = [p[:-3] if p.endswith(".rs") else p for p in parts]
    if parts[-1] == "mod":
        parts.pop()
    return unit(parts)


def code_of(text):
    # Tests may use anything; comments and doc links are not dependencies.
    text = text.split("#[cfg(test)]")[0]
    text = re.sub(r"//[^\n]*", "", text)
    return text


def use_tree(text, i, prefix, out):
    """Expands the use tree (or plain path) starting at text[i] into paths appended to out."""
    segs = list(prefix)
    while i < len(text):
        m = re.match(r"\s*(\w+|\*)\s*", text[i:])
        if m:
            segs.append(m.group(1))
            i += m.end()
            if text.startswith("::", i):
                i += 2
                continue
            out.append(segs)
            return i
        if text.startswith("{", i):
            i += 1
            while i < len(text):
                i = use_tree(text, i, segs, out)
                m = re.match(r"\s*([,}])", text[i:])
                if not m:
                    return i
                i += m.end()
                if m.group(1) == "}":
                    break
            return i
        break
    out.append(segs)
    return i


def deps(text):
    paths = []
    for m in re.finditer(r"(?<![\w$])crate::", text):
        use_tree(text, m.end(), [], paths)
    found = {unit(p) for p in paths}
    found.discard(None)
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
