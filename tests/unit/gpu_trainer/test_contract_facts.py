"""One value for each fact the image, the pod and the hook share: they all take it from the contract."""

from __future__ import annotations

import re
from pathlib import Path

from airflow_provider_mltrain.hooks.mlflow import MLflowHook, connection_json
from airflow_provider_mltrain.operators import _pod_spec as spec
from airflow_provider_mltrain.operators._arguments import RESERVED_ENV
from gpu_trainer import contract

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = (ROOT / "gpu_trainer" / "Dockerfile").read_text()
# The runtime stage is the image that runs; the builder's lines do not count.
RUNTIME = DOCKERFILE.split(" AS runtime", 1)[1]


def test_the_uid_is_above_10000_and_the_image_runs_as_it():
    assert contract.TRAINER_UID > 10000 and contract.TRAINER_GID > 10000
    assert f"groupadd --gid {contract.TRAINER_GID} trainer" in RUNTIME
    assert f"useradd --uid {contract.TRAINER_UID} --gid {contract.TRAINER_GID} " in RUNTIME
    users = re.findall(r"^USER (\S+)$", RUNTIME, flags=re.MULTILINE)
    assert users == [f"{contract.TRAINER_UID}:{contract.TRAINER_GID}"]


def test_the_pod_runs_as_the_image_user():
    context = spec.restricted_pod_security_context()
    assert (context.run_as_user, context.run_as_group, context.fs_group) == (
        contract.TRAINER_UID,
        contract.TRAINER_GID,
        contract.TRAINER_GID,
    )


def test_the_image_and_the_pod_agree_on_the_checkpoint_directory():
    assert spec.DEFAULT_CHECKPOINT_MOUNT == contract.CHECKPOINT_MOUNT
    made = re.search(r"mkdir -p ([^\\\n]+)", RUNTIME)
    assert made is not None and contract.CHECKPOINT_MOUNT in made.group(1).split()
    assert re.search(rf"chown trainer:trainer .*{re.escape(contract.CHECKPOINT_MOUNT)}\b", RUNTIME)
    assert re.search(rf"\b{contract.ENV_CHECKPOINT_DIR}={re.escape(contract.CHECKPOINT_MOUNT)}\s", RUNTIME)
    # The image states no other checkpoint directory.
    assert "/checkpoints " not in RUNTIME.replace(contract.CHECKPOINT_MOUNT, "")


def test_the_operator_reserves_exactly_the_contracts_variables():
    assert set(RESERVED_ENV) == set(contract.TRAINER_ENV_VARS)
    assert set(contract.CREDENTIAL_ENV_VARS) <= set(RESERVED_ENV)


def test_the_hooks_child_environment_uses_only_contract_names(airflow_conn):
    # Some settings exclude each other (insecure / ca_bundle, login / token): two connections cover all.
    airflow_conn(
        "with_ca",
        connection_json(
            "https://mlflow.example.com",
            login="user",
            password="secret-pw",
            registry_uri="https://registry.example.com",
            ca_bundle="/etc/ca.pem",
        ),
    )
    airflow_conn(
        "insecure", connection_json("https://mlflow.example.com", insecure=True, token="secret-token")
    )
    with_ca = MLflowHook("with_ca").child_environment()
    insecure = MLflowHook("insecure").child_environment()
    assert set(with_ca) | set(insecure) == set(contract.MLFLOW_CLIENT_ENV_VARS)
    # So the contract's function accepts it as is.
    built = contract.trainer_environment(
        hyperparameters={}, checkpoint_dir=None, mlflow=with_ca, literal_credentials=True
    )
    assert {name: built[name] for name in with_ca} == with_ca
