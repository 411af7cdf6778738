"""The modules of `estat` form layers: every import, including one inside
a function, points to a lower layer (or to a module of the same layer and
package, without a cycle). A new module must be given its layer here, so
that where it sits is a decision, not an accident."""

from __future__ import annotations

import ast
import pathlib

from twisted.trial import unittest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "estat"

# Top to bottom. A module is matched by its longest listed prefix.
LAYERS: list[tuple[str, ...]] = [
    ("estat.tap",),
    ("estat.workers",),
    ("estat.service",),
    ("estat.sdk",),
    ("estat.collect", "estat.admin"),
    ("estat.admission",),
    ("estat.wal",),
    ("estat.pipeline.batcher", "estat.pipeline.uploader", "estat.dlq"),
    ("estat.stores", "estat.http.channel"),
    ("estat.http", "estat.pipeline.queue", "estat.pipeline", "estat.loops"),
    ("estat.codec",),
    ("estat", "estat.model", "estat.validate", "estat.config", "estat.metrics", "estat.auth",
     "estat.lifecycle", "estat.signals", "estat.logs"),
]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The estat modules `path` imports anywhere in it; `from estat.pkg
    import mod` counts as importing `estat.pkg.mod` when that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("estat"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("estat"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found - {module_name(path)}


def layer_of(module: str) -> int:
    best, best_length = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def package_of(module: str) -> str:
    return module.rsplit(".", 1)[0]


class LayerTests(unittest.TestCase):
    def setUp(self) -> None:
        paths = sorted(ROOT.rglob("*.py"))
        self.modules = {module_name(path) for path in paths}
        self.graph = {module_name(path): imports_of(path, self.modules) for path in paths}

    def test_every_module_has_a_layer(self) -> None:
        self.assertEqual([m for m in sorted(self.modules) if layer_of(m) < 0], [])

    def test_imports_point_down(self) -> None:
        upward = []
        for module, imported in sorted(self.graph.items()):
            for target in sorted(imported):
                here, there = layer_of(module), layer_of(target)
                # A lower layer has a larger index; a package's __init__
                # may be imported by its own modules.
                same_package_peer = here == there and package_of(module) == package_of(target)
                own_submodule = target.startswith(module + ".")  # a package's __init__
                if own_submodule:
                    continue
                if there < here or (there == here and not same_package_peer
                                    and target != package_of(module)):
                    upward.append(f"{module} -> {target}")
        self.assertEqual(upward, [])

    def test_no_cycles(self) -> None:
        cycles = []
        state: dict[str, int] = {}

        def visit(module: str, path: list[str]) -> None:
            state[module] = 1
            for target in sorted(self.graph.get(module, ())):
                if state.get(target) == 1:
                    cycles.append(" -> ".join(path[path.index(target):] + [target]))
                elif target not in state:
                    visit(target, path + [target])
            state[module] = 2

        for module in sorted(self.graph):
            if module not in state:
                visit(module, [module])
        self.assertEqual(cycles, [])

    def test_the_check_sees_an_upward_import(self) -> None:
        self.graph["estat.model"] = {"estat.service"}
        with self.assertRaises(self.failureException):
            self.test_imports_point_down()
