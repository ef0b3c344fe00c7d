"""Fashion-MNIST-LT: Zalando's Fashion-MNIST (60,000 + 10,000 grey 28x28 images, 10 clothing classes, MIT licence) made
long-tailed with CIFAR-10-LT's profile, and `fetch_fashion_mnist`, which puts its four idx files in fastlt's cache.

The files are the ones https://github.com/zalandoresearch/fashion-mnist distributes (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``; gunzipped copies work
too). Debian ships them as the package ``dataset-fashion-mnist`` (under /usr/share/datasets/fashion-mnist/), which
`fetch_fashion_mnist` downloads and unpacks without root (``apt-get download`` + ``dpkg-deb -x``); fastlt downloads
nothing at run time.
"""

import glob
import os
import shutil
import subprocess
import tempfile

from fastlt.data.mnist import IDX_FILES, IdxLongTailed, idx_path, read_idx
from fastlt.data.transforms import NORMALIZATION
from fastlt.errors import FetchError, MissingFileError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FOLDER = "/usr/share/datasets/fashion-mnist"  # where the package installs the files
FILE_STEMS = [stem for pair in IDX_FILES.values() for stem in pair]
FETCH_COMMAND = "fastlt data fashion-mnist"
WHERE_TO_PUT = ("download the four idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from https://github.com/zalandoresearch/"
                "fashion-mnist into {folder} (or any folder, then set data.root=<that folder>)")


def default_cache():
    """Where `fastlt data fashion-mnist` puts the files: $FASTLT_DATA/fashion-mnist, else
    ~/.cache/fastlt/fashion-mnist."""
    data_home = os.environ.get("FASTLT_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "fastlt")
    return os.path.join(data_home, "fashion-mnist")


def missing_files(folder):
    """The idx files (by stem) that `folder` lacks in either the .gz or the gunzipped form."""
    return [stem for stem in FILE_STEMS if not os.path.isfile(idx_path(folder, stem))]


def find_fashion_mnist(root=None):
    """The folder to read: `root` (data.root) when given, else the first of the cache (`default_cache()`) and
    Debian's folder that holds all four files. A clear MissingFileError says how to get them otherwise."""
    if root is not None:
        folder = os.path.expanduser(str(root))
        missing = missing_files(folder)
        if missing:
            raise MissingFileError(
                f"data.root {str(root)!r} lacks the Fashion-MNIST files {', '.join(missing)} (.gz or gunzipped): run "
                f"`{FETCH_COMMAND} --dest {root}` on a machine with Debian's apt-get, or "
                + WHERE_TO_PUT.format(folder=root))
        return folder
    candidates = [default_cache(), DEBIAN_FOLDER]
    for folder in candidates:
        if not missing_files(folder):
            return folder
    raise MissingFileError(
        f"Fashion-MNIST not found in {' or '.join(candidates)} (data.root is not set): run `{FETCH_COMMAND}` (Debian's "
        f"apt-get, no root needed), or " + WHERE_TO_PUT.format(folder=candidates[0]))


class FashionMNISTLT(IdxLongTailed):
    """Fashion-MNIST-LT: ``n_c = int(n_max * (1/ratio)**(c/9))`` training images of class c (T-shirt/top, trouser,
    pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot: class 0 is the largest, CIFAR-10-LT's shape),
    one fixed subset per `seed`; val = `val_per_class` images per class from the training images outside the subset;
    test = the whole balanced 10k test set. See `IdxLongTailed`.

    n_max 6000 (every image of class 0, CIFAR-10-LT's full-size protocol) leaves class 0 nothing for a val split:
    recipes then set data.val_per_class=0 (no val split, the last epoch is kept). `root`: see `find_fashion_mnist`.

    >>> FashionMNISTLT(split="train", n_max=1000, ratio=100).class_counts.tolist()  # doctest: +SKIP
    [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    """

    normalization = NORMALIZATION["fashion_mnist"]

    def __init__(self, split="train", n_max=1000, ratio=100, seed=0, val_per_class=50, root=None, transform=None):
        super().__init__(find_fashion_mnist(root), split, n_max, ratio, seed, val_per_class, transform)


def _run(command, cwd):
    """Run a packaging tool; a failure is a FetchError carrying the tool's own last words."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        said = " ".join((result.stderr or result.stdout).split()[-60:])
        raise FetchError(f"`{' '.join(command)}` failed (exit {result.returncode}: {said})")


def fetch_fashion_mnist(dest=None):
    """Put the four Fashion-MNIST idx files in `dest` (default `default_cache()`, where the recipes look) from
    Debian's package, without root: ``apt-get download dataset-fashion-mnist`` (about 31 MB) and ``dpkg-deb -x``
    in a temporary folder. Does nothing when `dest` already holds them. Returns `dest`.

    Raises FetchError (an OSError) saying where to put the files by hand when apt-get / dpkg-deb are missing or fail.
    """
    dest = os.path.expanduser(str(dest if dest is not None else default_cache()))
    if not missing_files(dest):
        return dest
    by_hand = WHERE_TO_PUT.format(folder=dest)
    tools = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if tools:
        raise FetchError(f"{FETCH_COMMAND} needs Debian's package tools; {' and '.join(tools)} "
                      f"{'is' if len(tools) == 1 else 'are'} not on PATH: {by_hand}")
    with tempfile.TemporaryDirectory(prefix="fastlt-fashion-mnist-") as work:
        try:
            _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=work)
            packages = glob.glob(os.path.join(work, "*.deb"))
            if len(packages) != 1:
                raise FetchError(f"`apt-get download {DEBIAN_PACKAGE}` left {len(packages)} .deb files, expected one")
            tree = os.path.join(work, "tree")
            _run(["dpkg-deb", "-x", packages[0], tree], cwd=work)
            source = os.path.join(tree, DEBIAN_FOLDER.lstrip("/"))
            missing = missing_files(source)
            if missing:
                raise FetchError(f"the {DEBIAN_PACKAGE} package has no {', '.join(missing)} under {DEBIAN_FOLDER}")
            os.makedirs(dest, exist_ok=True)
            for stem in FILE_STEMS:
                path = idx_path(source, stem)
                read_idx(path)  # an idx file, not a truncated download
                staged = os.path.join(dest, f".{os.path.basename(path)}.partial")
                shutil.copyfile(path, staged)
                os.replace(staged, os.path.join(dest, os.path.basename(path)))  # never a half-written file in dest
        except (OSError, ValueError) as error:
            raise FetchError(f"{FETCH_COMMAND}: {error}; instead, {by_hand}") from error
    return dest
