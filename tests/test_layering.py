"""Packages import only downward: the layers listed in docs/design.md ("Layers"), read from there.

Every `import` and `from ... import` of every module under qianwen/ counts, at module level or inside a
function, relative or absolute. A module belongs to the longest layer entry its dotted name starts with
(`chat.template` before `chat`); `qianwen` is the package's own `__init__`."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qianwen"


def layers() -> dict[str, int]:
    """Entry -> its layer's number, from the numbered list under docs/design.md's "## Layers"."""
    text = (ROOT / "docs/design.md").read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    out: dict[str, int] = {}
    for line in section.splitlines():
        if m := re.match(r"(\d+)\. (.*)", line):
            for name in re.findall(r"`([\w.]+)`", m[2].split(" (", 1)[0]):
                out[name] = int(m[1])
    return out


def modules() -> dict[str, Path]:
    """Dotted name below qianwen (`loading.hf`, `qianwen` for the package itself) -> file."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or "qianwen"] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(the module of ours it imports, line) for each import statement anywhere in the file."""
    package = name.split(".") if path.name == "__init__.py" and name != "qianwen" else name.split(".")[:-1]
    if name == "qianwen":
        package = []
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
                targets = [f"qianwen.{module}" if module else "qianwen"]
            else:
                targets = [node.module or ""]
            # `from pkg import submodule` imports the submodule
            sub = [f"{targets[0]}.{a.name}" for a in node.names]
            targets = [t for t in sub if t.removeprefix("qianwen.") in known] or targets
        else:
            continue
        for t in targets:
            if t == "qianwen" or t.startswith("qianwen."):
                found.append((t.removeprefix("qianwen.") if t != "qianwen" else "qianwen", node.lineno))
    return found


def unit_of(module: str, table: dict[str, int]) -> str | None:
    if module == "qianwen":
        return "qianwen" if "qianwen" in table else None
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:n])) in table:
            return prefix
    return None


def edges() -> list[tuple[str, str, str, str, int]]:
    """(from unit, to unit, from module, imported module, line) between different units."""
    table, mods = layers(), modules()
    out = []
    for name, path in mods.items():
        src = unit_of(name, table)
        for target, line in imports(name, path, set(mods)):
            dst = unit_of(target, table)
            if dst is not None and dst != src:
                out.append((src, dst, name, target, line))
    return out


def test_layer_list_is_read():
    table = layers()
    assert table["errors"] == 1 and table["cli"] == max(table.values())
    assert {"loading", "quant", "fast", "api", "engine", "train"} <= set(table)


def test_every_module_has_a_layer():
    table = layers()
    missing = [m for m in modules() if unit_of(m, table) is None]
    assert not missing, f"modules in no layer of docs/design.md: {missing}"


def test_imports_go_down():
    table, mods = layers(), modules()
    upward = [f"{mods[m].relative_to(ROOT)} (layer {table[a]} `{a}`) imports {t} (layer {table[b]} `{b}`), line {ln}"
              for a, b, m, t, ln in edges() if table[b] > table[a]]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b, *_ in edges():
        graph[a].add(b)
    # Tarjan's strongly connected components: a component of more than one package is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            comp.append(v)
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles between packages: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_walker_sees_every_kind_of_import(tmp_path):
    f = tmp_path / "example.py"
    f.write_text("import os\nimport qianwen\nfrom .. import api\nfrom . import native\n\n\ndef g():\n"
                 "    from ..loading.hf import read_json\n    import qianwen.train.merge\n"
                 "    from qianwen import load\n")
    known = {"api", "fast.native", "loading.hf", "train.merge"}
    assert imports("fast.example", f, known) == [("qianwen", 2), ("api", 3), ("fast.native", 4), ("loading.hf", 8),
                                                 ("train.merge", 9), ("qianwen", 10)]
