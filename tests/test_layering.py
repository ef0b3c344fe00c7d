"""The layers import downwards only: fastlt.ops (the fused ops) does not import the data, model, engine, recipe or
command layers (fastlt.cli, fastlt.doctor, fastlt.bench), not even lazily; the commands' modules fastlt.doctor and
fastlt.bench are imported by no other layer; the Triton kernels (kernels/, installed as fastlt.kernels) never import
fastlt.ops, which imports them; the benchmarks import themselves as installed, fastlt.bench.*, never as a top-level
`bench` package; and the package's import graph (lazy imports included) has no circle."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
UPPER_LAYERS = ("fastlt.data", "fastlt.models", "fastlt.engine", "fastlt.methods", "fastlt.cli", "fastlt.doctor",
                "fastlt.bench")
COMMANDS = ("fastlt.cli", "fastlt.doctor", "fastlt.bench")  # the top layer: imported by nothing else


def imported_modules(path):
    """Every module an `import` / `from ... import` statement in the file names, at any depth (lazy imports too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
    return names


COMPILED_MODULES = {"fastlt._C"}  # the compiled extension (setup.py): a module without a .py file


def package_modules():
    """{module name: its file} of every Python module of the installed package: fastlt/, bench/ (fastlt.bench) and
    kernels/ (fastlt.kernels)."""
    modules = {}
    for folder, package in ((ROOT / "fastlt", "fastlt"), (ROOT / "bench", "fastlt.bench"),
                            (ROOT / "kernels", "fastlt.kernels")):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            modules[".".join((package,) + parts).removesuffix(".__init__")] = path
    return modules


def import_graph():
    """{module: the package's modules it imports, lazily or not}: ``from a import b`` is an edge to the module
    ``a.b`` when there is one, else to ``a``."""
    modules = package_modules()
    known = modules.keys() | COMPILED_MODULES

    def owner(name):  # the package's module that `name` (a module or an attribute of one) is in, or None
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                targets.update(owner(f"{node.module}.{alias.name}") for alias in node.names)
        graph[name] = {target for target in targets if target and target != name and target in modules}
    return graph


def find_circle(graph):
    """A list of modules each importing the next and the last the first, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            circle = visit(node)
            if circle:
                return circle
    return None


def is_within(name, package):
    return name == package or name.startswith(package + ".")


def test_importing_fastlt_ops_loads_no_upper_layer():
    code = ("import sys, fastlt.ops\n"
            f"print(sorted(m for m in sys.modules if m.startswith({UPPER_LAYERS!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("path", sorted((ROOT / "fastlt" / "ops").glob("*.py")), ids=lambda path: path.name)
def test_ops_import_no_upper_layer_even_lazily(path):
    assert [name for name in imported_modules(path) if any(is_within(name, layer) for layer in UPPER_LAYERS)] == []


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda path: path.name)
def test_triton_kernels_do_not_import_fastlt_ops(path):
    assert [name for name in imported_modules(path) if is_within(name, "fastlt.ops")] == []


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda path: path.name)
def test_benchmarks_import_themselves_as_fastlt_bench(path):
    assert [name for name in imported_modules(path) if is_within(name, "bench")] == []


def test_the_import_scan_sees_lazy_imports(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef f():\n    from fastlt.ops._checks import labels\n    import bench.data\n")
    assert imported_modules(source) == ["os", "fastlt.ops._checks", "bench.data"]


def test_the_package_import_graph_has_no_circle():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle + circle[:1])


def test_the_circle_finder_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_the_commands_are_imported_by_no_other_layer():
    graph = import_graph()
    def command(name):
        return any(is_within(name, layer) for layer in COMMANDS)

    importers = {name: sorted(m for m, targets in graph.items() if name in targets and not command(m))
                 for name in graph if command(name)}
    assert {name: found for name, found in importers.items() if found} == {}
