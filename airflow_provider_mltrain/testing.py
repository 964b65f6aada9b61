"""Helpers for testing DAGs that use this provider (also used by the provider's own tests and demo)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.models.dagrun import DagRun
    from airflow.sdk import DAG


def run_dag(dag: DAG, **test_kwargs: Any) -> DagRun:
    """``dag.test()`` for a DAG that is not (yet) in a DAG bundle: a test's DAG, or one loaded by hand.

    Since Airflow 3.3, ``dag.test()`` starts its run from the *serialized* DAG, which normally comes from
    the DAG processor parsing the bundle that holds the DAG's file. This writes the DAG to the metadata
    database first, the way the DAG processor would, then runs it.

    :param dag: the DAG to run.
    :param test_kwargs: passed to ``dag.test()`` (``run_conf``, ``logical_date``, ...).
    """
    import os

    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=os.devnull, collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    return dag.test(**test_kwargs)


def xcom_value(dag_run: DagRun, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    """An XCom a finished run left in the metadata database (``None`` if there is none).

    :param dag_run: the run, as :func:`run_dag` returns it.
    :param task_id: the task that pushed it.
    :param key: the XCom key.
    :param map_index: the mapped task's index (-1 for an unmapped task).
    """
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(
            XComModel.get_many(
                run_id=dag_run.run_id,
                dag_ids=dag_run.dag_id,
                task_ids=task_id,
                key=key,
                map_indexes=map_index,
            )
        ).first()
        return None if row is None else XComModel.deserialize_value(row)
