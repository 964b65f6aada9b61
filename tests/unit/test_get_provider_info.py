"""The provider registers itself with Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib.metadata import distribution, entry_points

from airflow_provider_mltrain import __version__
from airflow_provider_mltrain.get_provider_info import get_provider_info


def _classpaths(info: dict) -> list[str]:
    paths = [conn["hook-class-name"] for conn in info["connection-types"]]
    paths += info.get("extra-links", [])
    for group in ("hooks", "operators", "sensors", "triggers"):
        for entry in info.get(group, []):
            paths += entry.get("python-modules", [])
            paths += [entry["class-name"]] if "class-name" in entry else []
    return paths


def test_entry_point_resolves_to_get_provider_info():
    (ep,) = [
        ep
        for ep in entry_points(group="apache_airflow_provider")
        if ep.dist.name == "airflow-provider-mltrain"
    ]
    assert ep.load() is get_provider_info


def test_package_name_and_version_match_the_distribution():
    info = get_provider_info()
    assert info["package-name"] == distribution("airflow-provider-mltrain").metadata["Name"]
    assert info["versions"] == [__version__] == [distribution("airflow-provider-mltrain").version]


def test_everything_listed_is_importable():
    for path in _classpaths(get_provider_info()):
        try:
            importlib.import_module(path)
        except ModuleNotFoundError:
            module, _, attr = path.rpartition(".")
            assert hasattr(importlib.import_module(module), attr), path


def test_provider_info_passes_airflows_own_schema():
    import json

    import jsonschema
    from airflow import providers_manager

    with open(providers_manager.__file__.replace("providers_manager.py", "provider_info.schema.json")) as fh:
        schema = json.load(fh)
    jsonschema.validate(get_provider_info(), schema)


def test_mlflow_conn_type_is_ours_and_clashes_with_no_installed_provider():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    hook = manager.hooks["mlflow"]
    assert hook is not None
    assert (hook.package_name, hook.hook_class_name) == (
        "airflow-provider-mltrain",
        "airflow_provider_mltrain.hooks.mlflow.MLflowHook",
    )
    claimants = [
        name
        for name, provider in manager.providers.items()
        if any(c.get("connection-type") == "mlflow" for c in provider.data.get("connection-types", []))
    ]
    assert claimants == ["airflow-provider-mltrain"]


def test_airflow_cli_lists_the_provider_and_the_connection_type():
    airflow = [sys.executable, "-m", "airflow"]
    providers = subprocess.run(
        [*airflow, "providers", "get", "airflow-provider-mltrain"], capture_output=True, text=True
    )
    hooks = subprocess.run([*airflow, "providers", "hooks", "-o", "plain"], capture_output=True, text=True)
    assert providers.returncode == 0, providers.stderr
    assert "airflow-provider-mltrain" in providers.stdout and __version__ in providers.stdout
    assert any(line.split()[:1] == ["mlflow"] for line in hooks.stdout.splitlines()), hooks.stdout
