"""Which pod states count as a disruption (``_preemption.disruption_of``), on the API's own pod objects."""

from __future__ import annotations

import pytest
from kubernetes.client import models as k8s

from airflow_provider_mltrain.operators._preemption import (
    DISRUPTION_REASONS,
    disruption_of,
    vanished_with_node,
)


def pod(*, phase: str = "Failed", conditions=(), reason=None, message=None) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="train-abc"),
        status=k8s.V1PodStatus(phase=phase, conditions=list(conditions), reason=reason, message=message),
    )


def target(reason: str, status: str = "True") -> k8s.V1PodCondition:
    return k8s.V1PodCondition(type="DisruptionTarget", status=status, reason=reason, message=f"by {reason}")


@pytest.mark.parametrize("reason", DISRUPTION_REASONS)
def test_every_disruption_target_reason_counts(reason):
    found = disruption_of(pod(conditions=[target(reason)]))
    assert found is not None
    assert (found.pod_name, found.reason, found.describe()) == ("train-abc", reason, f"{reason}: by {reason}")


def test_a_false_or_unknown_disruption_target_does_not_count():
    assert disruption_of(pod(conditions=[target("PreemptionByScheduler", status="False")])) is None
    assert disruption_of(pod(conditions=[target("SomethingNew")])) is None


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("NodeShutdown", "Pod was rejected as the node is shutting down."),
        ("Shutdown", "Node is shutting, evicting pods"),
        ("Terminated", "Pod was terminated in response to imminent node shutdown."),
    ],
)
def test_graceful_node_shutdown_without_the_condition_counts(reason, message):
    found = disruption_of(pod(reason=reason, message=message))
    assert found is not None and found.reason == reason


def test_an_ordinary_failure_or_other_terminated_reason_does_not_count():
    assert disruption_of(pod()) is None
    assert disruption_of(pod(reason="Terminated", message="container exited")) is None
    assert disruption_of(pod(reason="Evicted", message="The node was low on resource: memory.")) is None
    assert disruption_of(pod(phase="Running", reason="NodeShutdown")) is None


def test_a_vanished_pod_counts_only_when_its_node_is_gone():
    assert vanished_with_node("p", "node-1", node_exists=False) is not None
    assert vanished_with_node("p", "node-1", node_exists=True) is None
    assert vanished_with_node("p", "node-1", node_exists=None) is None
    assert vanished_with_node("p", None, node_exists=False) is None
