"""Optional dependencies: imported where they are used, so that every `fastlt` command runs in an install with only
the required ones, and a feature that needs one fails with an error naming the pip extra that installs it.

tests/test_install.py checks each extra named here against setup.py's ``extras_require``.
"""

import importlib

from fastlt.errors import MissingDependencyError

# top-level import name -> (pip package, the fastlt extra that installs it)
OPTIONAL_PACKAGES = {
    "torchvision": ("torchvision", "data"),
    "sklearn": ("scikit-learn", "data"),
    "nvidia.dali": ("nvidia-dali-cuda130", "dali"),
}


def install_hint(name: str) -> str:
    package, extra = OPTIONAL_PACKAGES[name]
    return f"pip install 'fastlt[{extra}]' (or pip install {package})"


def import_optional(module: str, needed_for: str):
    """``importlib.import_module(module)``, or a MissingDependencyError saying that `needed_for` needs its package."""
    top = next(name for name in OPTIONAL_PACKAGES if module == name or module.startswith(name + "."))
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or not (top == error.name or top.startswith(error.name + ".")):
            raise  # the package is there but lacks one of its own modules: not a missing optional dependency
        package = OPTIONAL_PACKAGES[top][0]
        raise MissingDependencyError(f"{package} is needed for {needed_for} but is not installed: "
                                     f"{install_hint(top)}") from error
