"""The `fastlt data` subcommand (its arguments live in fastlt/cli.py): put a data set's files where the recipes look."""

from fastlt.data.fashion_mnist import fetch_fashion_mnist


def data_command(args) -> str:
    """fastlt data fashion-mnist [--dest DIR]"""
    folder = fetch_fashion_mnist(args.dest)
    print(f"Fashion-MNIST idx files in {folder}")
    return folder
