"""The docstring examples of every `fastlt` module run as tests, with `torch` and `fastlt` already imported."""

import doctest
import importlib
import pkgutil

import pytest
import torch

import fastlt


def _modules():
    """fastlt and its installed sub-packages, including fastlt.kernels (kernels/) and fastlt.bench (bench/)."""
    names = []
    for package in ("fastlt", "fastlt.kernels", "fastlt.bench"):
        path = importlib.import_module(package).__path__
        names += [package] + [info.name for info in pkgutil.walk_packages(path, package + ".")]
    return [importlib.import_module(name) for name in sorted(set(names)) if ".test_" not in name]


def _examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for module in _modules():
        for test in finder.find(module, module.__name__, extraglobs={"torch": torch, "fastlt": fastlt}):
            # examples that need files the user has (CIFAR folders, list files) are all marked +SKIP: leave them out
            runnable = [example for example in test.examples if not example.options.get(doctest.SKIP)]
            # a module re-exporting another's function finds that docstring too: keep it once, where it is defined
            if runnable and test.name.startswith(module.__name__) and not any(t.name == test.name for t in found):
                found.append(test)
    return found


EXAMPLES = _examples()


def test_the_package_has_docstring_examples():
    assert len(EXAMPLES) >= 10, [test.name for test in EXAMPLES]


@pytest.mark.parametrize("example", EXAMPLES, ids=[test.name for test in EXAMPLES])
def test_docstring_example(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files (run folders) write them here
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    with fastlt.ops.use_backend(fastlt.ops.get_backend()):  # an example that switches backends does not leak it
        result = runner.run(example, out=report.append)
    assert result.failed == 0 and result.attempted > 0, "".join(report)
