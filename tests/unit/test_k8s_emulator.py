"""The Kubernetes API emulator answers the real clients (sync ``kubernetes``, async ``kubernetes_asyncio``)
through the Airflow connection, the way the lifecycle code will use them."""

from __future__ import annotations

import asyncio

import pytest

from tests.fixtures.k8s_emulator import KubernetesEmulator, matches_label_selector

JOBSET = {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": {"name": "train-1", "labels": {"app": "mltrain", "task": "a"}},
    "spec": {"suspend": True},
}


def _pod(name: str, owner_uid: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"jobset.sigs.k8s.io/jobset-name": "train-1"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "JobSet", "name": "train-1", "uid": owner_uid}],
        },
        "spec": {"containers": [{"name": "node", "image": "img"}]},
        "status": {"phase": "Running"},
    }


def test_sync_client_create_list_patch_log_and_delete_with_propagation(k8s_emulator: KubernetesEmulator):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import CoreV1Api, CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    api_client = KubernetesHook(conn_id="kubernetes_default").get_conn()
    custom, core = CustomObjectsApi(api_client), CoreV1Api(api_client)
    created = custom.create_namespaced_custom_object(
        "jobset.x-k8s.io", "v1alpha2", "default", "jobsets", JOBSET
    )
    with pytest.raises(ApiException) as duplicate:
        custom.create_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", "default", "jobsets", JOBSET)
    assert duplicate.value.status == 409

    listed = custom.list_namespaced_custom_object(
        "jobset.x-k8s.io", "v1alpha2", "default", "jobsets", label_selector="app=mltrain,task in (a,b)"
    )
    assert [item["metadata"]["name"] for item in listed["items"]] == ["train-1"]
    assert not custom.list_namespaced_custom_object(
        "jobset.x-k8s.io", "v1alpha2", "default", "jobsets", label_selector="task=b"
    )["items"]

    custom.patch_namespaced_custom_object(
        "jobset.x-k8s.io", "v1alpha2", "default", "jobsets", "train-1", {"spec": {"suspend": False}}
    )
    k8s_emulator.patch(
        "jobsets", "train-1", {"status": {"conditions": [{"type": "Completed", "status": "True"}]}}
    )
    got = custom.get_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", "default", "jobsets", "train-1")
    assert got["spec"]["suspend"] is False
    assert got["status"]["conditions"][0]["type"] == "Completed"

    k8s_emulator.create(_pod("train-1-node-0-0-abcde", created["metadata"]["uid"]))
    k8s_emulator.set_log("train-1-node-0-0-abcde", "one\ntwo\nthree\n")
    pods = core.list_namespaced_pod("default", label_selector="jobset.sigs.k8s.io/jobset-name=train-1")
    assert [pod.metadata.name for pod in pods.items] == ["train-1-node-0-0-abcde"]
    assert pods.items[0].status.phase == "Running"
    # As KubernetesPodOperator does: the client's own decoding of a text body returns str(bytes).
    log = core.read_namespaced_pod_log(
        "train-1-node-0-0-abcde", "default", container="node", tail_lines=2, _preload_content=False
    )
    assert log.data.decode() == "two\nthree\n"

    custom.delete_namespaced_custom_object(
        "jobset.x-k8s.io", "v1alpha2", "default", "jobsets", "train-1", propagation_policy="Foreground"
    )
    assert k8s_emulator.deletions[0] == ("jobsets", "default", "train-1", "Foreground")
    # The pod named the JobSet as its owner: it went with it.
    assert core.list_namespaced_pod("default").items == []
    with pytest.raises(ApiException) as gone:
        custom.get_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", "default", "jobsets", "train-1")
    assert gone.value.status == 404


def test_async_client_through_the_async_hook(k8s_emulator: KubernetesEmulator):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook
    from kubernetes_asyncio.client import CoreV1Api, CustomObjectsApi

    created = k8s_emulator.create(JOBSET)
    k8s_emulator.create(_pod("train-1-node-0-0-abcde", created["metadata"]["uid"]))
    k8s_emulator.set_log("train-1-node-0-0-abcde", "a\nb\n")

    async def read() -> tuple[dict, list[str], str]:
        hook = AsyncKubernetesHook(conn_id="kubernetes_default")
        async with hook.get_conn() as api_client:
            got = await CustomObjectsApi(api_client).get_namespaced_custom_object(
                "jobset.x-k8s.io", "v1alpha2", "default", "jobsets", "train-1"
            )
            pods = await CoreV1Api(api_client).list_namespaced_pod("default", label_selector="!absent")
            log = await CoreV1Api(api_client).read_namespaced_pod_log(
                "train-1-node-0-0-abcde", "default", tail_lines=1
            )
        return got, [pod.metadata.name for pod in pods.items], log

    got, pods, log = asyncio.run(read())
    assert got["spec"]["suspend"] is True
    assert pods == ["train-1-node-0-0-abcde"]
    assert log == "b\n"


def test_on_read_callback_advances_a_scenario_one_poll_at_a_time(k8s_emulator: KubernetesEmulator):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import CustomObjectsApi

    k8s_emulator.create(JOBSET)
    k8s_emulator.on_read(
        "jobsets", lambda emu, obj: emu.patch("jobsets", "train-1", {"spec": {"suspend": False}})
    )
    custom = CustomObjectsApi(KubernetesHook(conn_id="kubernetes_default").get_conn())
    got = custom.get_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", "default", "jobsets", "train-1")
    assert got["spec"]["suspend"] is False


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("a=1", True),
        ("a==1,b", True),
        ("a!=1", False),
        ("a in (0, 1)", True),
        ("a notin (1)", False),
        ("!c", True),
        ("c", False),
    ],
)
def test_label_selector(selector: str, expected: bool):
    assert matches_label_selector({"a": "1", "b": "2"}, selector) is expected


def _custom_api():
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import CoreV1Api, CustomObjectsApi

    api_client = KubernetesHook(conn_id="kubernetes_default").get_conn()
    return CustomObjectsApi(api_client), CoreV1Api(api_client)


VALID_JOBSET = {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": {"name": "admitted"},
    "spec": {
        "replicatedJobs": [
            {
                "name": "node",
                "replicas": 1,
                "template": {
                    "spec": {
                        "template": {
                            "spec": {
                                "containers": [{"name": "node", "image": "img"}],
                                "restartPolicy": "Never",
                            }
                        }
                    }
                },
            }
        ]
    },
}


def test_admission_refuses_what_the_crd_refuses_and_stores_the_defaults(k8s_emulator: KubernetesEmulator):
    from kubernetes.client.exceptions import ApiException

    custom, _ = _custom_api()
    created = custom.create_namespaced_custom_object(
        "jobset.x-k8s.io", "v1alpha2", "default", "jobsets", VALID_JOBSET
    )
    # JobSet's defaulting webhook ran: the stored object has what admit() added.
    stored = k8s_emulator.get("jobsets", "admitted")
    assert stored["spec"] != VALID_JOBSET["spec"] and created["spec"] == stored["spec"]

    broken = {**VALID_JOBSET, "metadata": {"name": "broken"}}
    broken["spec"] = {"replicatedJobs": [{"name": "node", "replicas": 1, "template": {}}]}
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", "default", "jobsets", broken)
    assert refused.value.status == 422 and "containers" in refused.value.body
    assert not k8s_emulator.exists("jobsets", "broken")

    # An update runs the webhook's update rules (replicatedJobs are immutable) ...
    with pytest.raises(ApiException) as immutable:
        custom.patch_namespaced_custom_object(
            "jobset.x-k8s.io",
            "v1alpha2",
            "default",
            "jobsets",
            "admitted",
            {"spec": {"replicatedJobs": [{**VALID_JOBSET["spec"]["replicatedJobs"][0], "replicas": 3}]}},
        )
    assert immutable.value.status == 422
    # ... a status write does not.
    custom.patch_namespaced_custom_object_status(
        "jobset.x-k8s.io", "v1alpha2", "default", "jobsets", "admitted", {"status": {"restarts": 1}}
    )
    assert k8s_emulator.get("jobsets", "admitted")["status"]["restarts"] == 1


def test_foreground_delete_keeps_the_owner_until_its_dependents_are_gone(k8s_emulator: KubernetesEmulator):
    from kubernetes.client import V1DeleteOptions

    custom, core = _custom_api()
    k8s_emulator.kubelet_plays_pods = True
    owner = k8s_emulator.create(VALID_JOBSET)
    pod = _pod("admitted-node-0", owner["metadata"]["uid"])
    pod["spec"]["nodeName"] = "node-a"
    k8s_emulator.create(pod)

    custom.delete_namespaced_custom_object(
        "jobset.x-k8s.io",
        "v1alpha2",
        "default",
        "jobsets",
        "admitted",
        body=V1DeleteOptions(propagation_policy="Foreground"),
    )
    marked = k8s_emulator.get("jobsets", "admitted")
    assert marked["metadata"]["deletionTimestamp"] and marked["metadata"]["finalizers"] == [
        "foregroundDeletion"
    ]
    # The running pod got the default grace period of 30 s: it is only marked, the kubelet ends it.
    dependent = core.read_namespaced_pod("admitted-node-0", "default")
    assert dependent.metadata.deletion_timestamp is not None
    assert dependent.metadata.deletion_grace_period_seconds == 30

    assert k8s_emulator.finalize_pods() == ["admitted-node-0"]
    assert not k8s_emulator.exists("pods", "admitted-node-0")
    assert not k8s_emulator.exists("jobsets", "admitted")


def test_pod_grace_period_follows_check_graceful_delete(k8s_emulator: KubernetesEmulator):
    _, core = _custom_api()
    k8s_emulator.kubelet_plays_pods = True
    for name, node, phase, grace in [
        ("scheduled", "node-a", "Running", 7),
        ("unscheduled", None, "Pending", 7),
        ("ended", "node-a", "Succeeded", 7),
    ]:
        pod = _pod(name, "none")
        pod["spec"]["terminationGracePeriodSeconds"] = grace
        if node:
            pod["spec"]["nodeName"] = node
        pod["status"]["phase"] = phase
        k8s_emulator.create(pod)
        core.delete_namespaced_pod(name, "default")
    assert k8s_emulator.get("pods", "scheduled")["metadata"]["deletionGracePeriodSeconds"] == 7
    assert not k8s_emulator.exists("pods", "unscheduled") and not k8s_emulator.exists("pods", "ended")
    # A second delete with grace 0 (kubectl --force) removes it.
    core.delete_namespaced_pod("scheduled", "default", grace_period_seconds=0)
    assert not k8s_emulator.exists("pods", "scheduled")


def test_without_a_kubelet_player_a_deleted_pod_goes_at_once(k8s_emulator: KubernetesEmulator):
    _, core = _custom_api()
    pod = _pod("p", "none")
    pod["spec"]["nodeName"] = "node-a"
    k8s_emulator.create(pod)
    core.delete_namespaced_pod("p", "default")
    assert not k8s_emulator.exists("pods", "p")
