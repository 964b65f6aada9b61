"""Print a pip constraints file that pins every direct dependency to the lower bound pyproject.toml allows.

``make test-lowest`` installs the provider under these pins and runs the tests, so each ``>=`` in
pyproject.toml is a version that was actually tested, not a guess. Standard library only: it runs before
any virtualenv exists.

Usage::

    python scripts/lowest_constraints.py [--extra dev] [--exclude torch] [--no-core] > lowest-constraints.txt

Every direct dependency must have a lower bound (``>=``, ``==`` or ``~=``); one without is an error,
because "the lowest version pip can find" is not something anyone tested.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, under its PyPI name
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        sys.exit("lowest_constraints.py needs Python >= 3.11 (tomllib) or the 'tomli' package on 3.10")

# name, [extras], version specifiers, ; marker  (PEP 508 without URL requirements, which we never use)
_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?P<specs>[^;]*?)\s*(?:;(?P<marker>.*))?$"
)
_LOWER_BOUND = re.compile(r"^(>=|==|~=)\s*(?P<version>[0-9][0-9A-Za-z.+!-]*)$")


def normalized(name: str) -> str:
    """The PEP 503 form of a distribution name, so ``Foo_Bar`` and ``foo-bar`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def version_key(version: str) -> tuple[int, ...]:
    """Order release versions (``2.16`` < ``2.16.1`` < ``3.0``); pre-release tags are not used here."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0]))


def lower_bound(requirement: str) -> tuple[str, str, str | None]:
    """``(normalized name, lower bound, marker)`` of one requirement string from pyproject.toml.

    :param requirement: a PEP 508 requirement such as ``"mlflow[auth]>=2.16,<4"``.
    :raises ValueError: when the requirement has no lower bound.
    """
    match = _REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    bounds = []
    for spec in filter(None, (s.strip() for s in match["specs"].split(","))):
        found = _LOWER_BOUND.match(spec)
        if found:
            bounds.append(found["version"])
    if not bounds:
        raise ValueError(
            f"requirement {requirement!r} has no lower bound: give it '>=<the lowest version tested>'"
        )
    marker = match["marker"].strip() if match["marker"] else None
    return normalized(match["name"]), max(bounds, key=version_key), marker


def lowest_pins(pyproject: Path, extras: list[str], exclude: set[str], core: bool = True) -> list[str]:
    """Constraint lines ``name==lower_bound`` for the project's dependencies and the given extras.

    A package required in several places (the core list and an extra) gets the highest of its lower
    bounds: that is the lowest version every place accepts.

    :param pyproject: path to pyproject.toml.
    :param extras: optional-dependency groups to include.
    :param exclude: package names left out (e.g. torch, whose build is chosen per platform).
    :param core: include ``project.dependencies``; False for an extra alone (the trainer image installs the
        ``trainer`` extra without Airflow).
    """
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise ValueError(f"unknown extra(s) {unknown}; pyproject.toml defines {sorted(optional)}")
    requirements = list(project.get("dependencies", [])) if core else []
    for extra in extras:
        requirements += optional[extra]
    pins: dict[str, tuple[str, str | None]] = {}
    for requirement in requirements:
        name, version, marker = lower_bound(requirement)
        if name in exclude:
            continue
        if name not in pins or version_key(version) > version_key(pins[name][0]):
            pins[name] = (version, marker)
    return [
        f"{name}=={version}" + (f"; {marker}" if marker else "") for name, (version, marker) in pins.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml"
    )
    parser.add_argument(
        "--extra", action="append", default=[], help="an optional-dependency group (repeatable)"
    )
    parser.add_argument("--exclude", action="append", default=[], help="a package to leave out (repeatable)")
    parser.add_argument(
        "--no-core", action="store_true", help="only the extras, not the project's own dependencies"
    )
    args = parser.parse_args(argv)
    try:
        exclude = {normalized(name) for name in args.exclude}
        pins = lowest_pins(args.pyproject, args.extra, exclude, core=not args.no_core)
    except ValueError as err:
        print(f"lowest_constraints.py: {err}", file=sys.stderr)
        return 2
    print(f"# Generated by scripts/lowest_constraints.py from {args.pyproject.name}; do not edit.")
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
