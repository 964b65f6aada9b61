"""Copy the bundled example DAGs into a dags folder: ``python -m airflow_provider_mltrain.examples DEST``.

The examples ship inside the wheel (``airflow_provider_mltrain.example_dags``), so ``pip install`` users
get them without cloning the repository.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path


def example_files() -> list[Path]:
    """The example DAG files shipped with the provider (``__init__.py`` excluded)."""
    root = resources.files("airflow_provider_mltrain.example_dags")
    return sorted(
        Path(str(entry))
        for entry in root.iterdir()
        if entry.name.endswith(".py") and entry.name != "__init__.py"
    )


def copy_examples(destination: Path, *, overwrite: bool = False) -> list[Path]:
    """Copy the example DAGs into ``destination`` (created if missing).

    :param destination: the dags folder.
    :param overwrite: replace files that already exist; otherwise refuse and name them.
    :raises FileExistsError: when a file exists and ``overwrite`` is False.
    """
    destination.mkdir(parents=True, exist_ok=True)
    sources = example_files()
    clashes = [destination / src.name for src in sources if (destination / src.name).exists()]
    if clashes and not overwrite:
        raise FileExistsError(f"already there (use --overwrite to replace): {', '.join(map(str, clashes))}")
    copied = []
    for src in sources:
        shutil.copyfile(src, destination / src.name)
        copied.append(destination / src.name)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point.

    :param argv: arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="python -m airflow_provider_mltrain.examples", description=__doc__)
    parser.add_argument("destination", nargs="?", type=Path, help="dags folder to copy into")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files of the same name")
    parser.add_argument("--list", action="store_true", help="list the example DAG files and exit")
    args = parser.parse_args(argv)
    if args.list or args.destination is None:
        for path in example_files():
            print(path)
        return 0
    try:
        copied = copy_examples(args.destination, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in copied:
        print(f"copied {path.name} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
