"""The layers import downwards only: fastlt.ops (the fused ops) does not import the data, model, engine or recipe
layers, not even lazily; the Triton kernels (kernels/, installed as fastlt.kernels) never import fastlt.ops, which
imports them; and the benchmarks import themselves as installed, fastlt.bench.*, never as a top-level `bench`
package."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
UPPER_LAYERS = ("fastlt.data", "fastlt.models", "fastlt.engine", "fastlt.methods")


def imported_modules(path):
    """Every module an `import` / `from ... import` statement in the file names, at any depth (lazy imports too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
    return names


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
