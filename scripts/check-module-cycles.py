#!/usr/bin/env python3
"""Lists pairs of modules of a crate's `src/` that import each other.

Usage: python3 scripts/check-module-cycles.py crates/server/src
Exits 1 if any module imports (with `use`, including `pub use` and grouped
imports, or by an inline `crate::…` path) a module that imports it back; test modules are ignored. A module
declaring a child (`mod x;`) is not an import.
"""
import os
import re
import sys


def modules(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if f.endswith(".rs"):
                rel = os.path.relpath(os.path.join(root, f), src)[:-3]
                name = rel.replace("/mod", "").replace("/", "::")
                name = "crate" if name in ("lib", "main") else name
                with open(os.path.join(root, f)) as fh:
                    mods[name] = fh.read().split("#[cfg(test)]")[0]
    return mods


def use_paths(src):
    """Every path named by a `use` item (groups expanded), and every
    `crate::…`/`super::…` path written inline."""
    for stmt in re.findall(r"\buse\s+([^;]+);", src):
        stmt = re.sub(r"\s+", "", stmt)
        yield from expand(stmt)
    yield from re.findall(r"\b(?:crate|super)(?:::\w+)+", src)


def expand(s):
    i = s.find("{")
    if i < 0:
        yield s.split(" as ")[0]
        return
    prefix, inner = s[:i], s[i + 1 : s.rfind("}")]
    depth, part = 0, ""
    for c in inner + ",":
        if c == "," and depth == 0:
            if part:
                yield from expand(prefix + part)
            part = ""
            continue
        depth += c == "{"
        depth -= c == "}"
        part += c
    return


def resolve(cur, path, names):
    parts = path.split("::")
    if parts[0] == "crate":
        base, parts = [], parts[1:]
    elif parts[0] == "super":
        base = cur.split("::")[:-1] if cur != "crate" else []
        parts = parts[1:]
        while parts and parts[0] == "super":
            base, parts = base[:-1], parts[1:]
    elif parts[0] == "self":
        base, parts = ([] if cur == "crate" else cur.split("::")), parts[1:]
    else:
        # A child module named without prefix (`use read::X`).
        base = [] if cur == "crate" else cur.split("::")
        if "::".join(base + parts[:1]) not in names:
            return None
    full = base + [p for p in parts if p != "self"]
    for i in range(len(full), 0, -1):
        cand = "::".join(full[:i])
        if cand in names:
            return cand
    return "crate" if parts else None


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "crates/server/src"
    mods = modules(src)
    names = set(mods)
    deps = {
        m: {r for p in use_paths(text) if (r := resolve(m, p, names)) and r != m}
        for m, text in mods.items()
    }
    mutual = sorted({tuple(sorted((a, b))) for a in deps for b in deps[a] if a in deps.get(b, ())})
    for a, b in mutual:
        print(f"{src}: {a} and {b} import each other")
    if not mutual:
        print(f"{src}: no module imports a module that imports it back ({len(mods)} modules)")
    return 1 if mutual else 0


if __name__ == "__main__":
    sys.exit(main())
