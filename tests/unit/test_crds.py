"""tests/fixtures/crds.py: the vendored CRDs' schemas and CEL rules refuse what the API server would."""

from __future__ import annotations

import copy
import re
from typing import Any

import celpy
import jsonschema
import pytest

from tests.fixtures import crds
from tests.fixtures.apierrors import OMIT


def trainjob(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "train-0a1b2c3d", "namespace": "ml"},
        "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}, **spec},
    }


def jobset(**spec: Any) -> dict[str, Any]:
    node = {
        "name": "node",
        "replicas": 1,
        "template": {
            "spec": {"template": {"spec": {"containers": [{"name": "node", "image": "trainer:1"}]}}}
        },
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "train-0a1b2c3d", "namespace": "ml"},
        "spec": {"replicatedJobs": [node], **spec},
    }


def all_rules() -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.extend((kind, rule) for rule in node.get("x-kubernetes-validations") or [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for api_version, kind in crds.CRD_FILES:
        walk(crds.crd_schema(api_version, kind))
    return found


def test_every_rule_of_the_vendored_crds_compiles_in_cel_python():
    rules = all_rules()
    assert {kind for kind, _ in rules} == {"JobSet", "TrainJob", "ClusterTrainingRuntime", "TrainingRuntime"}
    environment = celpy.Environment()
    for _, rule in rules:
        environment.program(environment.compile(rule["rule"]))


def test_kserves_inferenceservice_crd_carries_no_cel_rules_only_its_schema():
    """Nothing to evaluate there (KServe validates in its webhook, not ported here); the schema still holds."""
    schema = crds.crd_schema("serving.kserve.io/v1beta1", "InferenceService")
    assert "x-kubernetes-validations" not in repr(schema)
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "digits"},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "mlflow"}, "storageUri": "s3://b/m"}}},
    }
    crds.validate_custom_resource(isvc)
    isvc["spec"]["predictor"]["model"]["storageUrl"] = "s3://b/m"
    with pytest.raises(jsonschema.ValidationError, match="storageUrl"):
        crds.validate_custom_resource(isvc)


def test_a_valid_trainjob_passes():
    crds.validate_custom_resource(trainjob())
    assert crds.cel_errors(crds.apply_defaults(trainjob())) == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("t" * 64, "metadata.name must be no more than 63 characters"),
        ("1-train", "metadata.name must match RFC 1035 DNS label format"),
        ("train.model", "metadata.name must match RFC 1035 DNS label format"),
    ],
)
def test_trainjob_names_follow_the_crds_rules(name, message):
    manifest = trainjob()
    manifest["metadata"]["name"] = name
    (error,) = crds.cel_errors(manifest)
    # A rule at the root of the resource: field.Path's nil root, the object's value not shown.
    assert (error.field, error.value, error.detail) == ("<nil>", OMIT, message)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(f"<nil>: Invalid value: {message}")):
        crds.validate_custom_resource(manifest)


def test_trainjob_managed_by_must_be_trainer_or_multikueue():
    for allowed in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue"):
        crds.validate_custom_resource(trainjob(managedBy=allowed))
    with pytest.raises(jsonschema.ValidationError) as err:
        crds.validate_custom_resource(trainjob(managedBy="airflow-provider-mltrain.github.io/manager"))
    assert err.value.message == (
        'spec.managedBy: Invalid value: "airflow-provider-mltrain.github.io/manager": ManagedBy must be '
        "trainer.kubeflow.org/trainjob-controller or kueue.x-k8s.io/multikueue if set"
    )


def test_a_scalar_rule_shows_its_value_and_message():
    manifest = trainjob()
    manifest["spec"]["trainer"]["numProcPerNode"] = 0
    (error,) = crds.cel_errors(manifest)
    assert str(error) == (
        "spec.trainer.numProcPerNode: Invalid value: 0: numProcPerNode must be greater than or equal to 1"
    )


def test_jobset_startup_policy_in_order_excludes_depends_on():
    manifest = jobset(startupPolicy={"startupPolicyOrder": "InOrder"})
    second = copy.deepcopy(manifest["spec"]["replicatedJobs"][0])
    second.update(name="worker", dependsOn=[{"name": "node", "status": "Ready"}])
    manifest["spec"]["replicatedJobs"].append(second)
    with pytest.raises(jsonschema.ValidationError) as err:
        crds.validate_custom_resource(manifest)
    assert err.value.message == "spec: Invalid value: StartupPolicy and DependsOn APIs are mutually exclusive"
    manifest["spec"]["startupPolicy"]["startupPolicyOrder"] = "AnyOrder"
    crds.validate_custom_resource(manifest)


def test_a_rule_on_list_items_names_the_item():
    claim = {"metadata": {"name": "ckpt", "namespace": "other"}, "spec": {"accessModes": ["ReadWriteMany"]}}
    manifest = jobset(volumeClaimPolicies=[{"templates": [claim]}])
    (error,) = crds.cel_errors(crds.apply_defaults(manifest))
    assert error.field == "spec.volumeClaimPolicies[0]"
    assert error.detail == "namespace cannot be set for VolumeClaimPolicies templates"


def test_transition_rules_are_skipped_on_create_and_enforced_on_update():
    old = trainjob(activeDeadlineSeconds=600)
    crds.validate_custom_resource(old)  # `self == oldSelf` has no old value to compare on a create
    crds.validate_custom_resource(copy.deepcopy(old), old=old)
    changed = trainjob(activeDeadlineSeconds=60)
    with pytest.raises(
        jsonschema.ValidationError,
        match=re.escape("spec.activeDeadlineSeconds: Invalid value: 60: field is immutable"),
    ):
        crds.validate_custom_resource(changed, old=old)
    # JobSet's failure policy is immutable as a whole.
    first = jobset(failurePolicy={"maxRestarts": 1})
    with pytest.raises(
        jsonschema.ValidationError, match=r"spec\.failurePolicy: Invalid value: Value is immutable"
    ):
        crds.validate_custom_resource(jobset(failurePolicy={"maxRestarts": 2}), old=first)


def test_a_map_list_item_compares_with_the_old_item_of_the_same_key():
    """A runtime patch's manager is immutable, yet a patch under a new manager is a new item, not a change."""
    patch = {"manager": "example.com/a", "trainingRuntimeSpec": {}}
    old = trainjob(runtimePatches=[patch])
    renamed = trainjob(runtimePatches=[{**patch, "manager": "example.com/b"}])
    assert crds.cel_errors(renamed, old) == []


def test_a_rule_that_fails_to_evaluate_is_an_error_naming_it():
    schema = {
        "type": "object",
        "properties": {"spec": {"type": "object", "x-kubernetes-validations": [{"rule": "self.x > 1"}]}},
    }
    errors: list[Any] = []
    crds._cel(schema, None, {"spec": {}}, None, errors)
    (error,) = errors
    assert error.field == "spec" and error.value == "object"
    assert error.detail.endswith("evaluating rule: self.x > 1")


def test_defaults_are_applied_before_validation():
    defaulted = crds.apply_defaults(jobset())
    (node,) = defaulted["spec"]["replicatedJobs"]
    assert node["groupName"] == "default"
    assert "groupName" not in jobset()["spec"]["replicatedJobs"][0]
    defaulted_job = crds.apply_defaults(trainjob())
    assert defaulted_job["spec"]["runtimeRef"]["kind"] == "ClusterTrainingRuntime"
