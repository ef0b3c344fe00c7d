"""fastlt's user errors: what the person running fastlt can fix (a config value, a data file, a run folder, a
missing optional package, no GPU), as opposed to a bug in fastlt or a library.

The `fastlt` command prints a :class:`UserError` as one line on stderr and exits 2; every other exception keeps its
traceback (`--debug` shows the traceback of a user error too). Each subclass also derives from the builtin
exception a Python caller would catch (``FileNotFoundError``, ``ValueError``, ``ImportError``, ``RuntimeError``).

This module imports nothing, so that every layer and the light `fastlt --help` path can use it.
"""


class UserError(Exception):
    """Something the user asked for that fastlt cannot do, with a message saying what to change."""


class ConfigError(UserError, ValueError):
    """A recipe or override that fastlt cannot run: unknown key, wrong value type or range (any layer that reads a
    recipe section raises it, e.g. fastlt.engine.mix.build_mixup; fastlt.methods.config re-exports it)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (recipe, data root, list file, run folder, checkpoint) does not exist."""


class DataError(UserError, ValueError):
    """A data file that exists but cannot be used: an unreadable image, a malformed list file or label."""


class FetchError(UserError, OSError):
    """Data files could not be fetched (a package tool missing or failing); the message says where to put them by
    hand."""


class MissingDependencyError(UserError, ImportError):
    """An optional package this feature needs is not installed; the message names the pip extra."""


class DeviceUnavailableError(UserError, RuntimeError):
    """The requested device does not exist here (e.g. ``device=cuda`` on a machine without a CUDA GPU)."""
