#!/usr/bin/env python3
"""The source layout's two rules, checked on every crate of the workspace (tools/test.sh runs it):

1. No import cycle between the files of a crate: file A depends on file B when A names a path
   into B's module (`crate::b::..`, `super::..`, or a child module by name, `b::..`). Unit-test
   modules (`#[cfg(test)]` and everything after it) may reach anywhere and are not read.
2. No source file over 600 lines (binaries' and integration tests' files included).

Exit status 1, with each cycle's files and the edges that close it, when a rule is broken.
Usage: tools/check-layout.py [REPO_ROOT]
"""
import os
import re
import sys

MAX_LINES = 600
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def code_only(text):
    """The text without comments, string and char literals, and the unit-test module."""
    text = text.split("#[cfg(test)]")[0]
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif (m := re.match(r'r(#*)"', text[i:])) and (i == 0 or not re.match(r"\w", text[i - 1])):
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            i = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and (m := re.match(r"'(\\.|[^\\'])'", text[i:])):
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def modules(src):
    """Each .rs file of a crate's library (or binary, alone) and its module path."""
    files = {}
    lib = os.path.exists(os.path.join(src, "lib.rs"))
    for dirpath, _, names in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        if rel_dir.split(os.sep)[0] == "bin":
            continue
        for name in names:
            if not name.endswith(".rs") or (rel_dir == "." and name == "main.rs" and lib):
                continue  # a binary beside a library is a crate of its own
            parts = [] if rel_dir == "." else rel_dir.split(os.sep)
            stem = name[:-3]
            if not (stem == "mod" or (not parts and stem in ("lib", "main"))):
                parts.append(stem)
            files[tuple(parts)] = os.path.join(dirpath, name)
    return files


def dependencies(files):
    known = set(files)

    def owner(path):  # the longest module prefix that is a file
        for k in range(len(path), -1, -1):
            if tuple(path[:k]) in known:
                return tuple(path[:k])
        return None

    edges = {m: set() for m in files}
    for module, path in files.items():
        code = code_only(open(path, encoding="utf-8", errors="replace").read())
        is_mod_file = os.path.basename(path) in ("mod.rs", "lib.rs", "main.rs")
        parent = module if is_mod_file else module[:-1]
        targets = []
        for group in re.finditer(r"\bcrate::\{([^}]*)\}", code):
            targets += [p.strip().split("::") for p in group.group(1).split(",")]
        targets += [m.group(1).split("::") for m in re.finditer(rf"\bcrate((?:::{IDENT})+)", code)]
        targets = [[s for s in t if re.fullmatch(IDENT, s)] for t in targets]
        # `pub(super)` and `pub(in super::..)` are visibilities, not paths.
        for m in re.finditer(rf"(?<!pub\()(?<!\bin )\bsuper((?:::{IDENT})*)(?!\w)", code):
            up = parent[:-1] if is_mod_file else parent
            targets.append(list(up) + [s for s in m.group(1).split("::") if s])
        for m in re.finditer(rf"(?<![\w:])(?:self::)?({IDENT})((?:::{IDENT})*)::", code):
            here = module if is_mod_file else module
            if here + (m.group(1),) in known:
                targets.append(list(here) + [m.group(1)] + [s for s in m.group(2).split("::") if s])
        for t in targets:
            o = owner(t)
            if o is not None and o != module:
                edges[module].add(o)
    return edges


def cycles(edges):
    """Strongly connected components of two or more modules (Tarjan, iterative)."""
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(comp)
    return found


def too_long(folder, root):
    """Prints each .rs file below `folder` over the size rule; returns how many."""
    found = 0
    walk = []
    for dirpath, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "target"]  # build output (the fuzz crate's own)
        walk.append((dirpath, names))
    for dirpath, names in sorted(walk):
        for name in sorted(n for n in names if n.endswith(".rs")):
            path = os.path.join(dirpath, name)
            lines = sum(1 for _ in open(path, encoding="utf-8", errors="replace"))
            if lines > MAX_LINES:
                found += 1
                print(f"{os.path.relpath(path, root)}: {lines} lines (at most {MAX_LINES}): split it by idea")
    return found


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    failures = 0
    for crate in sorted(os.listdir(root)):
        src = os.path.join(root, crate, "src")
        if not (os.path.isfile(os.path.join(root, crate, "Cargo.toml")) and os.path.isdir(src)):
            continue
        files = modules(src)
        failures += too_long(src, root)
        edges = dependencies(files)
        for comp in cycles(edges):
            failures += 1
            members = set(comp)
            names = sorted(os.path.relpath(files[m], root) for m in comp)
            print(f"{crate}: import cycle of {len(comp)} files: {', '.join(names)}")
            for a in sorted(comp):
                for b in sorted(edges[a] & members):
                    print(f"    {os.path.relpath(files[a], root)} -> {os.path.relpath(files[b], root)}")
    # Integration tests: each file is a crate of its own; only the size rule applies.
    failures += too_long(os.path.join(root, "tests"), root)
    print(f"layout: {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
