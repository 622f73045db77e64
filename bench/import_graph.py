"""Import graph of the packages (`python bench/import_graph.py`): package edges, and any import
cycle between files (lazy, function-level imports included), from the source by AST.

docs/ARCHITECTURE.md's graph is this output; a file-level cycle or a package cycle is printed
and exits 1.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data", "model", "kernels", "optim", "train", "launch")


def module_edges() -> dict[str, set[str]]:
    """module -> the modules of PACKAGES it imports (top-level or inside functions)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            mod = f"{pkg}.{path.stem}"
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for name in names:
                    parts = name.split(".")
                    if parts[0] in PACKAGES and len(parts) > 1 and (ROOT / parts[0] / f"{parts[1]}.py").is_file():
                        target = ".".join(parts[:2])
                        if target != mod:
                            edges[mod].add(target)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    edges = module_edges()
    packages: dict[str, set[str]] = defaultdict(set)
    for mod, targets in edges.items():
        for t in targets:
            if mod.split(".")[0] != t.split(".")[0]:
                packages[mod.split(".")[0]].add(t.split(".")[0])
    for pkg in PACKAGES:
        print(f"{pkg:8s} -> {', '.join(sorted(packages.get(pkg, ()))) or '(nothing)'}")
    bad = cycles(edges) + cycles(packages)
    for comp in bad:
        print("cycle:", " <-> ".join(comp))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
