"""The data store's credentials for a child process, from an Amazon (S3) Airflow connection.

The local launcher runs the trainer as a subprocess of the worker. The trainer reads ``s3://`` data
through fsspec/s3fs, which take credentials, endpoint and region from botocore's environment variables.
Those come from the task's connection here and go into the child's environment only, never into the
worker's ``os.environ`` (where every later task of the worker would see them).

Nothing heavy is imported at module level: the Amazon provider (boto3) is imported when a task asks.
"""

from __future__ import annotations

import logging

from gpu_trainer import contract

log = logging.getLogger(__name__)


def aws_child_environment(aws_conn_id: str) -> dict[str, str]:
    """The variables a child process needs to reach S3 as ``aws_conn_id`` does.

    Credentials are resolved the way the Amazon provider resolves them for the connection (login and
    password, a role to assume, or, for a connection without keys, botocore's default chain); the
    connection's ``endpoint_url`` extra (global or S3's ``service_config``) and region are passed on.
    A connection that does not exist gives no variables and a warning: a trainer reading local files
    needs none, and one reading ``s3://`` then fails with botocore's "Unable to locate credentials".

    :param aws_conn_id: the Amazon Web Services connection id.
    :return: names from :data:`gpu_trainer.contract.DATA_STORE_ENV_VARS` -> values.
    """
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.sdk.bases.hook import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException
    from airflow.sdk.log import mask_secret

    try:
        BaseHook.get_connection(aws_conn_id)
    except AirflowNotFoundException:
        log.warning(
            "aws_conn_id=%r: no such Airflow connection, so the trainer gets no data-store credentials "
            "(fine for local files; s3:// data needs the connection).",
            aws_conn_id,
        )
        return {}
    hook = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="s3")
    access_key, secret_key, token, endpoint, region = contract.DATA_STORE_ENV_VARS
    env: dict[str, str] = {}
    found = hook.get_session().get_credentials()
    # Frozen: refreshable (assumed-role) credentials could change between reading the key and the secret.
    credentials = found.get_frozen_credentials() if found is not None else None
    if credentials is not None and credentials.access_key and credentials.secret_key:
        # Registered with Airflow's masker: a log line that quotes them prints '***'.
        mask_secret(credentials.secret_key)
        env[access_key] = credentials.access_key
        env[secret_key] = credentials.secret_key
        if credentials.token:
            mask_secret(credentials.token)
            env[token] = credentials.token
    endpoint_url = hook.conn_config.get_service_endpoint_url(service_name="s3")
    if endpoint_url:
        env[endpoint] = endpoint_url
    if hook.conn_config.region_name:
        env[region] = hook.conn_config.region_name
    return env
