"""The package's layering, read from the source with ``ast`` (nothing of poise is imported).

* The pure layers (balancing, health state, routing, backend selection, the failure table,
  retry rules and verdicts, the PROXY protocol and ClientHello parsers) do no I/O: neither
  they nor anything they import at run time reach asyncio, sockets, TLS, the server or the
  connection classes; what is tested on a fake clock stays free of an event loop.
* No import cycle among modules beyond the allow-list below, at run time (imports inside
  functions included) and with the type-only imports (``if TYPE_CHECKING:``) counted too.

Each exception says why it is there; an exception that no longer applies must go.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

PURE = (
    "poise.balancing",  # and every module under it
    "poise.health.state",
    "poise.health.passive",
    "poise.health.status",
    "poise.routing",
    "poise.selection",
    "poise.failures",
    "poise.l7.retry",
    "poise.l7.verdicts",
    "poise.l4.proxy_protocol",
    "poise.tls.clienthello",
)
IO = frozenset(
    {
        "asyncio",
        "selectors",
        "socket",
        "ssl",
        "subprocess",
        "uvloop",
        "poise.server",
        "poise.workers",
        "poise.reload",
        "poise.dataplane",
        "poise.l7.client",
        "poise.l7.upstream",
        "poise.l7.tunnel",
        "poise.l4.listener",
        "poise.l4.relay",
        "poise.health.checker",
        "poise.health.probes",
    }
)
# Imports the pure layers may reach I/O through, and why.
IO_EDGES = {
    ("poise.config", "poise.config.load"): "the config package exports the loader, which "
    "validates certificates, CA bundles, ciphers and ticket keys with ssl (config.tls -> "
    "tls.checks, tls.certs, tls.tickets, none of which imports the config) and service names "
    "with poise.registry, whose __init__ loads the stores (asyncio). "
    "The pure layers import poise.config.model only, which loads the package __init__",
}
# Import cycles among modules counting the type-only imports (none at run time), and why.
TYPE_CYCLES = {
    frozenset(
        {
            "poise.accesslog",
            "poise.h2.upstream",
            "poise.l7.attempts",
            "poise.l7.client",
            "poise.l7.context",
            "poise.l7.memo",
            "poise.l7.reader",
            "poise.l7.request",
            "poise.l7.response",
            "poise.l7.tunnel",
            "poise.l7.upstream",
            "poise.l7.verdicts",
        }
    ): "the client and upstream connections and their exchange name each other's types; "
    "attempts.py (the client's cold paths), reader.py (its request half), memo.py (its "
    "repeated heads), response.py (the "
    "response head towards it) and verdicts.py (retry and passive-health decisions) take the "
    "connections, the exchange and the context, typed; at run time none imports the other's "
    "module back (the upstream talks to the client only for lifecycle: forward, complete, "
    "failed, retry, tunnel, write pause); h2/upstream.py's streams are upstream connections "
    "to that code (MuxStream subclasses UpstreamConnection), which the client's dispatch "
    "hands HTTP/2 backends' requests, typed both ways",
    frozenset({"poise.l4.listener", "poise.l4.relay"}): "the relay reports back to the "
    "listener that started it, typed",
    frozenset({"poise.admin.api", "poise.admin.metrics", "poise.server"}): "the admin API "
    "and /metrics are the operator's view of the whole process: the server builds them and "
    "they read it (listeners, workers, registry, reload), typed; membership, reload and the "
    "data-plane numbers do not know the Server (poise.membership)",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "poise").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = modules()


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str) -> Iterator[tuple[str, bool, bool]]:
    """(module imported, type only, at module level) for each import in ``name``, in
    functions too. A name imported from a package is the submodule of that name if any."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(node: ast.AST, type_only: bool, top: bool) -> Iterator[tuple[str, bool, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child.test):
                for stmt in child.body:
                    yield from walk_one(stmt, True, top)
                for stmt in child.orelse:
                    yield from walk_one(stmt, type_only, top)
            else:
                yield from walk_one(child, type_only, top)

    def walk_one(node: ast.AST, type_only: bool, top: bool) -> Iterator[tuple[str, bool, bool]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, type_only, top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), type_only, top
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from walk(node, type_only, False)
        else:
            yield from walk(node, type_only, top)

    return walk(ast.parse(path.read_text(), str(path)), False, True)


def loads(name: str, *, in_functions: bool = False) -> set[str]:
    """What importing ``name`` loads directly (with ``in_functions``, what its functions
    import too): its run-time imports, each with the packages above it (their __init__
    runs too)."""
    out = set()
    for target, type_only, top in imports(name):
        if type_only or not (top or in_functions):
            continue
        parts = target.split(".")
        out.add(target)
        out.update(".".join(parts[:i]) for i in range(2, len(parts)))
    out.discard(name)
    return out


def poise_graph(*, type_only: bool) -> dict[str, set[str]]:
    """Module -> the poise modules it imports (at run time, in functions too; with
    ``type_only`` the type-only imports too). Packages above an imported module are left
    out: a package loading its own submodules is no cycle."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, only_for_types, _ in imports(name):
            if target in MODULES and target != name and (type_only or not only_for_types):
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root, children in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(children)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, todo = work[-1]
            child = next(todo, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def is_pure(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PURE)


def test_the_module_list_is_the_source() -> None:
    for name in PURE:
        assert name in MODULES, f"{name}: no such module (update PURE)"
    assert "poise.balancing.round_robin" in MODULES


def test_the_pure_layers_reach_no_io() -> None:
    """Follow every run-time import from each pure module (its functions' too) through what
    the modules it imports load; none leads to I/O except through an edge of IO_EDGES."""
    problems = []
    for start in filter(is_pure, MODULES):
        via: dict[str, str] = {start: ""}
        todo = [start]
        while todo:
            name = todo.pop()
            for target in sorted(loads(name, in_functions=name == start)):
                if target in via or (name, target) in IO_EDGES:
                    continue
                via[target] = name
                if target in IO:
                    chain = [target]
                    while via[chain[-1]]:
                        chain.append(via[chain[-1]])
                    problems.append(" -> ".join(reversed(chain)))
                elif target in MODULES:
                    todo.append(target)
    assert not problems, "pure layers reaching I/O:\n" + "\n".join(problems)


def test_each_io_exception_is_still_an_import() -> None:
    for importer, target in IO_EDGES:
        assert target in loads(importer), (
            f"{importer} no longer imports {target}: remove it from IO_EDGES"
        )


def test_no_import_cycle_at_run_time() -> None:
    assert cycles(poise_graph(type_only=False)) == []


def test_no_new_import_cycle_with_the_type_only_imports() -> None:
    found = cycles(poise_graph(type_only=True))
    new = [sorted(c) for c in found if not any(c <= allowed for allowed in TYPE_CYCLES)]
    assert not new, f"import cycles not in TYPE_CYCLES: {new}"
    gone = [sorted(a) for a in TYPE_CYCLES if not any(c & a for c in found)]
    assert not gone, f"cycles of TYPE_CYCLES no longer there: remove them: {gone}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


IMPORT_FIRST = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "poise" or m.startswith("poise.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {exc!r}")
print("\\n".join(failed))
"""


def test_every_module_can_be_imported_first() -> None:
    """A package cycle broke this once: importing poise.tls.contexts (or anything that
    imported it) before poise.config failed half-way, as the config package imported the
    TLS checks back from it. Each module is imported first, in one fresh interpreter."""
    import os
    import subprocess
    import sys

    names = [n for n in modules() if not n.endswith("__main__")]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_FIRST, *names],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout
