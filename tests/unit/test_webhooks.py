"""tests/fixtures/webhooks.py: the ported JobSet and Kubeflow Trainer webhooks refuse what upstream refuses,
and admit() answers as the API server would."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from airflow_provider_mltrain.operators import _manifests as manifests
from tests.fixtures import webhooks
from tests.fixtures.apierrors import AdmissionError
from tests.fixtures.gpu_operator import make_context
from tests.unit.operators.test_distributed_training import make_op


def built(backend: str, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("num_nodes", 2)
    kwargs.setdefault("checkpoint_uri", "s3://b/ckpt")
    return make_op(backend=backend, **kwargs).build_manifest(make_context())


def refusal(manifest: dict[str, Any], **kwargs: Any) -> AdmissionError:
    with pytest.raises(AdmissionError) as err:
        webhooks.admit(manifest, **kwargs)
    return err.value


@pytest.mark.parametrize(
    ("value", "errors"),
    [
        ("kueue.x-k8s.io/manager", []),
        ("example.com/a/b:c~d", []),
        (manifests.PATCH_MANAGER, []),
        ("", ["m: Required value"]),
        (
            "airflow-provider-mltrain",
            ['m: Invalid value: "airflow-provider-mltrain": must be a domain-prefixed path'],
        ),
        ("/manager", ['m: Invalid value: "/manager": must be a domain-prefixed path']),
        ("example.com/", ['m: Invalid value: "example.com/": must be a domain-prefixed path']),
        ("Example_Com/x", ['m: Invalid value: "Example_Com": a lowercase RFC 1123 subdomain must consist']),
        ("example.com/a b", ['m: Invalid value: "a b": Invalid path (regex used for validation is']),
    ],
)
def test_is_domain_prefixed_path_follows_apimachinery(value, errors):
    found = [str(e) for e in webhooks.is_domain_prefixed_path("m", value)]
    assert len(found) == len(errors) and all(f.startswith(e) for f, e in zip(found, errors, strict=True)), (
        found
    )


def test_every_trainjob_is_refused_when_its_patch_manager_is_not_a_domain_prefixed_path():
    """Defect 1: Trainer's webhook refused every backend="trainjob" task (the manager was a bare name)."""
    manifest = built("trainjob")
    (patch,) = manifest["spec"]["runtimePatches"]
    assert webhooks.is_domain_prefixed_path("spec.runtimePatches.manager", patch["manager"]) == []
    webhooks.admit(manifest)

    patch["manager"] = "airflow-provider-mltrain"  # what the operator sent before
    err = refusal(manifest)
    assert (err.code, err.reason) == (403, "Forbidden")
    assert err.message == (
        'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request: '
        'spec.runtimePatches.manager: Invalid value: "airflow-provider-mltrain": must be a domain-prefixed '
        'path (such as "acme.io/foo")'
    )


def test_trainer_rejects_torchruns_reserved_env_in_the_trainer():
    manifest = built("trainjob")
    manifest["spec"]["trainer"]["env"] += [
        {"name": "PET_NNODES", "value": "3"},
        {"name": "PET_MASTER_ADDR", "value": "x"},
        {"name": "PET_OTHER", "value": "1"},  # only torchrun's five are reserved
    ]
    err = refusal(manifest)
    assert "spec.trainer.env: Invalid value: " in err.message
    assert err.message.endswith(
        "must not have reserved envs, invalid envs configured: [PET_MASTER_ADDR PET_NNODES]"
    )


def test_trainer_rejects_env_in_a_runtime_patch_of_the_node_container():
    manifest = built("trainjob")
    patch = manifest["spec"]["runtimePatches"][0]
    container = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"
    ]["spec"]["containers"][0]
    container["env"] = [{"name": "NCCL_DEBUG", "value": "INFO"}]
    assert (
        "must not have envs for the dataset-initializer, model-initializer, node containers"
        in refusal(manifest).message
    )


def test_trainer_needs_the_runtime_installed_and_its_initializers_for_an_initializer():
    manifest = built("trainjob", runtime_ref="torch-custom")
    err = refusal(manifest)
    assert 'spec.RuntimeRef: Invalid value: {"apiGroup":"trainer.kubeflow.org"' in err.message
    assert 'clustertrainingruntimes.trainer.kubeflow.org "torch-custom" not found: specified ' in err.message
    runtime = copy.deepcopy(webhooks.installed_runtimes()[0])
    runtime["metadata"]["name"] = "torch-custom"
    webhooks.admit(manifest, runtimes=[runtime])

    manifest["spec"]["initializer"] = {"dataset": {"storageUri": "hf://digits"}}
    assert (
        "must have dataset-initializer job when trainJob is configured with input datasetConfig"
        in refusal(manifest, runtimes=[runtime]).message
    )


def test_trainer_refuses_a_runtime_patch_change_of_a_running_trainjob():
    old = webhooks.admit(built("trainjob"))
    old["spec"]["suspend"] = False  # Kueue admitted it
    new = copy.deepcopy(old)
    new["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"
    ]["spec"]["template"]["spec"]["nodeSelector"] = {"pool": "b"}
    assert (
        "RuntimePatches can only be modified when the TrainJob is suspended" in refusal(new, old=old).message
    )
    new["spec"]["suspend"] = True  # Kueue suspending it may change them in the same request
    webhooks.admit(new, old=old)


def test_jobset_names_must_leave_room_for_job_and_pod_names():
    manifest = built("jobset", num_nodes=4)
    manifest["metadata"]["name"] = "a" * 52  # a-...-node-0 fits 63; a-...-node-0-3-abcde does not
    err = refusal(manifest)
    assert (err.code, err.reason) == (422, "Invalid")
    assert err.message.startswith(
        f'admission webhook "vjobset.kb.io" denied the request: JobSet.jobset.x-k8s.io "{"a" * 52}" is invalid: '
    )
    assert err.message.endswith(
        f'spec.replicatedJobs[0].name: Invalid value: "{"a" * 52}-node-0": JobSet name is too long, pod names '
        "generated for this JobSet will exceed 63 characters"
    )
    manifest["metadata"]["name"] = "a" * 62
    assert "job names generated for this JobSet will exceed 63 characters" in refusal(manifest).message


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s["failurePolicy"]["rules"][0].update(onJobFailureReasons=["Preempted"]),
            "<nil>: Internal error: invalid job failure reason 'Preempted' in failure policy is not a recognized "
            "job failure reason",
        ),
        (
            lambda s: s["failurePolicy"]["rules"][0].update(name="restart-on-preemption"),
            "invalid failure policy rule name 'restart-on-preemption', a failure policy rule name must start",
        ),
        (
            lambda s: s["failurePolicy"]["rules"].append(copy.deepcopy(s["failurePolicy"]["rules"][0])),
            "rule names are not unique, rules with indices [0 1] all have the same name 'restartOnPreemption'",
        ),
        (
            lambda s: s["failurePolicy"]["rules"][0].update(targetReplicatedJobs=["worker"]),
            "invalid replicatedJob name 'worker' in failure policy does not appear in .spec.ReplicatedJobs",
        ),
        (
            lambda s: s["failurePolicy"]["rules"][0].update(action="RestartJob"),
            "RestartJob and RestartJobAndIgnoreMaxRestarts failure policy actions are not allowed when "
            "RestartJob feature gate is disabled",
        ),
        (
            lambda s: s["network"].update(subdomain="Nodes"),
            'spec.network.subdomain: Invalid value: "Nodes": a lowercase RFC 1123 subdomain must consist',
        ),
        (
            lambda s: s.update(managedBy="airflow"),
            'spec.managedBy: Invalid value: "airflow": must be a domain-prefixed path',
        ),
        (
            lambda s: s["replicatedJobs"][0].update(dependsOn=[{"name": "node", "status": "Ready"}]),
            "DependsOn can't be set for the first ReplicatedJob",
        ),
        (
            lambda s: s.update(coordinator={"replicatedJob": "node", "podIndex": 2}),
            "coordinator pod index 2 is invalid for replicatedJob node job index 0",
        ),
    ],
)
def test_jobset_webhook_rules(change, message):
    manifest = built("jobset")
    change(manifest["spec"])
    assert message in refusal(manifest).message


def test_jobset_replicated_jobs_are_immutable_except_what_kueue_sets_while_suspended():
    old = webhooks.admit(built("jobset", queue_name="team-a"))
    new = copy.deepcopy(old)
    pod = new["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    pod["spec"]["nodeSelector"] = {"flavor": "h100"}
    pod["metadata"]["labels"]["kueue.x-k8s.io/podset"] = "node"
    new["spec"]["suspend"] = False  # Kueue admits and injects its flavor's node selector in one update
    webhooks.admit(new, old=old)

    running = copy.deepcopy(new)
    moved = copy.deepcopy(running)
    moved["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["nodeSelector"] = {
        "flavor": "a100"
    }
    assert 'spec.replicatedJobs: Invalid value: [{"groupName"' in refusal(moved, old=running).message
    assert refusal(moved, old=running).message.endswith(": field is immutable")


def test_admit_returns_the_stored_object_with_every_default_and_leaves_the_input_alone():
    manifest = built("jobset")
    sent = copy.deepcopy(manifest)
    stored = webhooks.admit(manifest)
    assert manifest == sent
    spec = stored["spec"]
    assert spec["successPolicy"] == {"operator": "All"}
    assert spec["startupPolicy"] == {"startupPolicyOrder": "AnyOrder"}
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    assert spec["replicatedJobs"][0]["groupName"] == "default"
    trainjob = webhooks.admit(built("trainjob"))
    assert trainjob["spec"]["runtimePatches"][0]["time"].endswith("Z")


def test_admit_checks_the_crd_first_and_passes_other_kinds_through():
    manifest = built("trainjob")
    manifest["spec"]["managedBy"] = "airflow-provider-mltrain.github.io/manager"
    err = refusal(manifest)
    assert (err.code, err.reason) == (422, "Invalid")
    assert err.message.startswith(
        f'TrainJob.trainer.kubeflow.org "{manifest["metadata"]["name"]}" is invalid: '
    )
    assert "spec.managedBy" in err.message and [e.field for e in err.errors] == ["spec.managedBy"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}
    assert webhooks.admit(pod) == pod
