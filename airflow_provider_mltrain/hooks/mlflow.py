"""MLflowHook: an Airflow connection type for MLflow tracking servers.

Nothing here imports mlflow at module level: this module is imported on every DAG parse that uses an
operator of this provider, and mlflow costs hundreds of milliseconds to import.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from airflow.exceptions import AirflowException
from airflow.sdk.bases.hook import BaseHook

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel, Run
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.utils.rest_utils import MlflowHostCreds

#: URI schemes a connection's host may use. http(s) reach a tracking server; the others are the
#: embedded default (a local store the worker writes itself).
REMOTE_SCHEMES = ("http", "https")
LOCAL_SCHEMES = ("sqlite", "file", "postgresql", "mysql", "mssql")
#: test_connection() must answer within seconds, not MLflow's minutes of default retries.
PING_TIMEOUT_S = 5
PING_RETRIES = 1


class MLflowConnectionError(AirflowException):
    """The MLflow connection is missing, malformed, unreachable or refused."""


class MLflowRegistryError(AirflowException):
    """A run, logged model, registered model or model version is missing or in a state that forbids the step."""


class ModelSource(NamedTuple):
    """What a model version is created from (see :meth:`MLflowHook.resolve_model_source`).

    :param source: the version's source URI (``models:/m-...`` for an MLflow 3 logged model).
    :param run_id: the run that produced it (None when unknown).
    :param model_id: the MLflow 3 logged model id (None for a plain artifact location).
    """

    source: str
    run_id: str | None
    model_id: str | None


@functools.cache
def _scoped_client_class() -> Callable[..., MlflowClient]:
    """Build (once) an ``MlflowClient`` whose REST stores take credentials from the hook.

    MLflow resolves a REST store's credentials from ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` /
    ``_TOKEN`` in ``os.environ`` each time it builds the store. Writing them there would leak them to
    every other task of the worker process and race between threads. Instead the stores are built with
    a ``get_host_creds`` callable bound to this connection (the same constructor MLflow's own store
    registry uses), and the client's tracking and registry clients are given those stores.
    """
    from mlflow import MlflowClient
    from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
    from mlflow.store.tracking.rest_store import RestStore as TrackingRestStore
    from mlflow.tracking._model_registry.client import ModelRegistryClient
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    class _ScopedTrackingServiceClient(TrackingServiceClient):
        def __init__(self, tracking_uri: str, get_host_creds: Callable[[], MlflowHostCreds]) -> None:
            self._scoped_store = TrackingRestStore(get_host_creds)
            super().__init__(tracking_uri)

        @property
        def store(self) -> Any:
            return self._scoped_store

    class _ScopedModelRegistryClient(ModelRegistryClient):
        def __init__(
            self, registry_uri: str, tracking_uri: str, get_host_creds: Callable[[], MlflowHostCreds]
        ) -> None:
            self._scoped_store = RegistryRestStore(get_host_creds)
            super().__init__(registry_uri, tracking_uri)

        @property
        def store(self) -> Any:
            return self._scoped_store

    class ScopedMlflowClient(MlflowClient):
        def __init__(
            self,
            tracking_uri: str,
            registry_uri: str,
            tracking_creds: Callable[[], MlflowHostCreds] | None,
            registry_creds: Callable[[], MlflowHostCreds] | None,
        ) -> None:
            super().__init__(tracking_uri=tracking_uri, registry_uri=registry_uri)
            if tracking_creds is not None:
                self._tracking_client = _ScopedTrackingServiceClient(tracking_uri, tracking_creds)
            if registry_creds is not None:
                # MlflowClient builds its registry client lazily under this attribute name.
                self._registry_client_lazy = _ScopedModelRegistryClient(
                    registry_uri, tracking_uri, registry_creds
                )

    return ScopedMlflowClient


class MLflowHook(BaseHook):
    """Interact with an MLflow tracking server (and its model registry) through an Airflow connection.

    The connection's *host* is the tracking URI: ``http(s)://host:port[/path]`` for a tracking server,
    or ``sqlite:///path/mlflow.db`` / ``file:///path`` for a local store. *Login* and *password* are
    MLflow basic-auth credentials. Extras (all optional):

    - ``token``: a bearer token (instead of login/password);
    - ``registry_uri``: a separate model registry URI (defaults to the tracking URI);
    - ``insecure``: ``true`` to skip TLS verification; ``ca_bundle``: path of a CA bundle instead;
    - ``ui_url``: base URL of the MLflow UI for operator links (defaults to the tracking URI).

    Credentials never reach ``os.environ``: :meth:`get_conn` binds them to the client's stores, and
    :meth:`child_environment` hands them to a subprocess's environment only.

    :param mlflow_conn_id: the Airflow connection id.
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "mlflow"
    hook_name = "MLflow"

    def __init__(self, mlflow_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.mlflow_conn_id = mlflow_conn_id

    # -- connection form -------------------------------------------------------------------------

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Show only what applies to MLflow: the URI in *host*, basic-auth login/password."""
        return {
            "hidden_fields": ["schema", "port", "extra"],
            "relabeling": {"host": "Tracking URI", "login": "Username", "password": "Password"},
            "placeholders": {
                "host": "https://mlflow.example.com or sqlite:////data/mlflow.db",
                "login": "MLflow basic-auth user (optional)",
                "password": "MLflow basic-auth password (optional)",
                "token": "bearer token (instead of username/password)",
                "registry_uri": "defaults to the tracking URI",
                "ca_bundle": "/etc/ssl/certs/mlflow-ca.pem",
                "ui_url": "defaults to the tracking URI",
            },
        }

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields for the connection form (Airflow versions with the Flask-based form)."""
        from flask_appbuilder.fieldwidgets import BS3PasswordFieldWidget, BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import BooleanField, PasswordField, StringField

        return {
            "token": PasswordField(lazy_gettext("Bearer token"), widget=BS3PasswordFieldWidget()),
            "registry_uri": StringField(lazy_gettext("Registry URI"), widget=BS3TextFieldWidget()),
            "insecure": BooleanField(lazy_gettext("Skip TLS verification"), default=False),
            "ca_bundle": StringField(lazy_gettext("CA bundle path"), widget=BS3TextFieldWidget()),
            "ui_url": StringField(lazy_gettext("MLflow UI base URL"), widget=BS3TextFieldWidget()),
        }

    # -- connection parsing ------------------------------------------------------------------------

    @functools.cached_property
    def _settings(self) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(self.mlflow_conn_id)
        except AirflowNotFoundException as err:
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r} is not defined: create it in the UI or set "
                f"AIRFLOW_CONN_{self.mlflow_conn_id.upper()}='mlflow://...' (see the README)"
            ) from err
        extra = conn.extra_dejson
        tracking_uri = self._tracking_uri(conn.host or "", conn.schema, conn.port)
        token = extra.get("token") or None
        # Registered so a value that reaches a log line is printed as '***'.
        for secret in (conn.password, token):
            if secret:
                self._mask(secret)
        insecure = extra.get("insecure", False)
        if isinstance(insecure, str):
            insecure = insecure.strip().lower() in ("1", "true", "yes", "on")
        ca_bundle = extra.get("ca_bundle") or None
        if insecure and ca_bundle:
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r}: extras 'insecure' and 'ca_bundle' exclude "
                "each other; set one"
            )
        if token and (conn.login or conn.password):
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r}: set either login/password or the 'token' "
                "extra, not both"
            )
        registry_uri = extra.get("registry_uri") or tracking_uri
        self._check_uri("registry_uri", registry_uri)
        return {
            "tracking_uri": tracking_uri,
            "registry_uri": registry_uri,
            "username": conn.login or None,
            "password": conn.password or None,
            "token": token,
            "insecure": bool(insecure),
            "ca_bundle": ca_bundle,
            "ui_url": (extra.get("ui_url") or (tracking_uri if self._is_remote(tracking_uri) else "")).rstrip(
                "/"
            ),
        }

    def _tracking_uri(self, host: str, schema: str | None, port: int | None) -> str:
        host = host.strip()
        if not host:
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r} has no host: set it to the tracking URI, "
                "e.g. http://mlflow:5000 or sqlite:////data/mlflow.db"
            )
        if "://" not in host:
            # A URI-form connection ("mlflow://host:5000") arrives as a bare host, port and schema.
            # "schema" then carries the scheme the user meant; http unless told otherwise.
            scheme = schema if schema in REMOTE_SCHEMES else "http"
            host = f"{scheme}://{host}" + (f":{port}" if port else "")
        self._check_uri("host", host)
        return host.rstrip("/")

    def _check_uri(self, field: str, uri: str) -> None:
        parts = urlsplit(uri)
        scheme = parts.scheme.split("+", 1)[0]
        if scheme in REMOTE_SCHEMES:
            if not parts.hostname:
                raise MLflowConnectionError(
                    f"MLflow connection {self.mlflow_conn_id!r}: {field} {uri!r} has no host name"
                )
            try:
                parts.port  # noqa: B018 - raises on a malformed port
            except ValueError as err:
                raise MLflowConnectionError(
                    f"MLflow connection {self.mlflow_conn_id!r}: {field} {uri!r} has a malformed port"
                ) from err
        elif scheme not in LOCAL_SCHEMES:
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r}: {field} {uri!r} has unsupported scheme "
                f"{parts.scheme!r}; allowed: {', '.join(REMOTE_SCHEMES + LOCAL_SCHEMES)}"
            )

    @staticmethod
    def _is_remote(uri: str) -> bool:
        return urlsplit(uri).scheme in REMOTE_SCHEMES

    @staticmethod
    def _mask(secret: str) -> None:
        from airflow.sdk.log import mask_secret

        mask_secret(secret)

    @property
    def tracking_uri(self) -> str:
        """The connection's tracking URI (no credentials in it)."""
        return str(self._settings["tracking_uri"])

    @property
    def registry_uri(self) -> str:
        """The model registry URI (the tracking URI unless the connection says otherwise)."""
        return str(self._settings["registry_uri"])

    @property
    def ui_url(self) -> str:
        """Base URL of the MLflow UI, or ``""`` for a local store without a UI."""
        return str(self._settings["ui_url"])

    def host_creds(self, uri: str | None = None) -> MlflowHostCreds:
        """MLflow's credentials object for ``uri`` (default: the tracking URI), from this connection only.

        :param uri: the server URI the credentials are for.
        """
        from mlflow.utils.rest_utils import MlflowHostCreds

        s = self._settings
        return MlflowHostCreds(
            host=uri or s["tracking_uri"],
            username=s["username"],
            password=s["password"],
            token=s["token"],
            ignore_tls_verification=s["insecure"],
            server_cert_path=s["ca_bundle"],
        )

    # -- clients -----------------------------------------------------------------------------------

    def get_conn(self) -> MlflowClient:
        """An ``MlflowClient`` bound to this connection, its credentials scoped to the client."""
        s = self._settings
        client_class = _scoped_client_class()
        tracking_creds = functools.partial(self.host_creds, s["tracking_uri"])
        registry_creds = functools.partial(self.host_creds, s["registry_uri"])
        return client_class(
            s["tracking_uri"],
            s["registry_uri"],
            tracking_creds if self._is_remote(s["tracking_uri"]) else None,
            registry_creds if self._is_remote(s["registry_uri"]) else None,
        )

    def child_environment(self) -> dict[str, str]:
        """The MLflow variables a child process (the local launcher's trainer) needs for this connection.

        Meant for a subprocess's ``env`` only; never merged into this process's ``os.environ``.
        """
        s = self._settings
        env = {"MLFLOW_TRACKING_URI": s["tracking_uri"]}
        if s["registry_uri"] != s["tracking_uri"]:
            env["MLFLOW_REGISTRY_URI"] = s["registry_uri"]
        if s["username"]:
            env["MLFLOW_TRACKING_USERNAME"] = s["username"]
        if s["password"]:
            env["MLFLOW_TRACKING_PASSWORD"] = s["password"]
        if s["token"]:
            env["MLFLOW_TRACKING_TOKEN"] = s["token"]
        if s["insecure"]:
            env["MLFLOW_TRACKING_INSECURE_TLS"] = "true"
        if s["ca_bundle"]:
            env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = s["ca_bundle"]
        return env

    # -- checks ------------------------------------------------------------------------------------

    def ping(self, *, timeout: float = PING_TIMEOUT_S, retries: int = PING_RETRIES) -> None:
        """Reach the server (or open the local store) with a short timeout and bounded retries.

        :param timeout: seconds per HTTP attempt.
        :param retries: retries after the first attempt.
        :raises MLflowConnectionError: naming the connection and the cause.
        """
        s = self._settings
        uri = s["tracking_uri"]
        if not self._is_remote(uri):
            try:
                self.get_conn().search_experiments(max_results=1)
            except Exception as err:
                raise MLflowConnectionError(
                    f"MLflow connection {self.mlflow_conn_id!r}: cannot open store {uri}: {err}"
                ) from err
            return
        import requests
        from mlflow.utils.rest_utils import http_request

        try:
            response = http_request(
                self.host_creds(uri),
                "/api/2.0/mlflow/experiments/search",
                "GET",
                params={"max_results": 1},
                max_retries=retries,
                backoff_factor=0.5,
                backoff_jitter=0.0,
                timeout=timeout,
                raise_on_status=False,
            )
        except requests.exceptions.RequestException as err:
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r}: server {uri} is unreachable "
                f"({type(err).__name__}: {self._first_line(err)})"
            ) from err
        except Exception as err:  # MLflow wraps exhausted retries in MlflowException
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r}: server {uri} is unreachable ({self._first_line(err)})"
            ) from err
        if response.status_code in (401, 403):
            who = (
                f"user {s['username']!r}"
                if s["username"]
                else ("the token" if s["token"] else "no credentials")
            )
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r}: server {uri} refused {who} "
                f"(HTTP {response.status_code}): check the connection's login/password or token"
            )
        if response.status_code != 200:
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r}: server {uri} answered HTTP "
                f"{response.status_code}: {response.text[:200]}"
            )

    def test_connection(self) -> tuple[bool, str]:
        """Check the connection from the Airflow UI; never raises."""
        try:
            self.ping()
        except Exception as err:
            return False, str(err)
        return True, f"Connected to MLflow at {self.tracking_uri}"

    @staticmethod
    def _first_line(err: BaseException) -> str:
        text = str(err).strip()
        return text.splitlines()[0][:300] if text else type(err).__name__

    # -- UI links ----------------------------------------------------------------------------------

    def run_url(self, experiment_id: str, run_id: str) -> str:
        """Link to a run in the MLflow UI ("" when the connection has no UI).

        :param experiment_id: the run's experiment.
        :param run_id: the run.
        """
        return f"{self.ui_url}/#/experiments/{experiment_id}/runs/{run_id}" if self.ui_url else ""

    def model_version_url(self, name: str, version: str | int) -> str:
        """Link to a registered model version in the MLflow UI ("" when the connection has no UI).

        :param name: registered model name.
        :param version: the version.
        """
        from urllib.parse import quote

        return f"{self.ui_url}/#/models/{quote(name, safe='')}/versions/{version}" if self.ui_url else ""

    # -- registry (issue 5) ------------------------------------------------------------------------
    # What MLflowRegisterOperator and ModelQualityBranchOperator need: find runs and logged models,
    # register a version idempotently, wait for READY, move aliases with a recorded previous holder, and
    # read a champion's metrics. Errors name the object and the server so a failed task says what to fix.

    #: Version tag naming the version that held ``alias`` before this version took it (rollback target).
    PREVIOUS_VERSION_TAG = "mltrain.previous_version.{alias}"

    @functools.cached_property
    def _client(self) -> MlflowClient:
        # One client per hook: the registry steps make a dozen calls and the client holds no state that
        # could go stale within a task.
        return self.get_conn()

    def _where(self) -> str:
        return f"on {self.tracking_uri} (connection {self.mlflow_conn_id!r})"

    @staticmethod
    def _error_code(err: BaseException) -> str:
        return str(getattr(err, "error_code", ""))

    def get_run_or_raise(self, run_id: str) -> Run:
        """The run, or a clear error when the server does not know it.

        :param run_id: the MLflow run id.
        :raises MLflowRegistryError: when the run does not exist.
        """
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_run(run_id)
        except MlflowException as err:
            if self._error_code(err) == "RESOURCE_DOES_NOT_EXIST":
                raise MLflowRegistryError(f"MLflow run {run_id!r} not found {self._where()}") from err
            raise

    def list_run_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Paths of a run's artifacts directly under ``path`` (directories end in ``/``).

        Over HTTP this asks the tracking server's REST endpoint with this connection's credentials:
        MLflow's artifact repositories would read credentials from ``os.environ`` instead.

        :param run_id: the run.
        :param path: a directory inside the run's artifacts (the root when None).
        """
        if not self._is_remote(self.tracking_uri):
            return [f.path + ("/" if f.is_dir else "") for f in self._client.list_artifacts(run_id, path)]
        from mlflow.utils.rest_utils import http_request

        params = {"run_id": run_id, **({"path": path} if path else {})}
        response = http_request(self.host_creds(), "/api/2.0/mlflow/artifacts/list", "GET", params=params)
        if response.status_code != 200:
            raise MLflowRegistryError(
                f"cannot list artifacts of run {run_id!r} {self._where()}: HTTP {response.status_code} "
                f"{response.text[:200]}"
            )
        files = response.json().get("files", [])
        return [f["path"] + ("/" if f.get("is_dir") else "") for f in files]

    def logged_models_of_run(self, run: Run) -> list[LoggedModel]:
        """The MLflow 3 logged models (``models:/m-...``) a run produced.

        :param run: the run (from :meth:`get_run_or_raise`).
        """
        models: list[LoggedModel] = []
        page_token = None
        while True:
            page = self._client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run.info.run_id}'",
                page_token=page_token,
            )
            models.extend(m for m in page if m.source_run_id == run.info.run_id)
            page_token = page.token
            if not page_token:
                return models

    @staticmethod
    def logged_model_id(model_uri: str) -> str | None:
        """The logged model id of a ``models:/m-...`` URI; None for any other URI.

        :param model_uri: a model URI.
        """
        prefix = "models:/"
        if not model_uri.startswith(prefix):
            return None
        rest = model_uri[len(prefix) :].strip("/")
        return rest if rest.startswith("m-") and "/" not in rest and "@" not in rest else None

    def resolve_model_source(
        self, *, run_id: str | None, model_uri: str | None, artifact_path: str = "model"
    ) -> ModelSource:
        """Work out what a model version is created from, checking that it exists.

        - ``models:/m-<id>`` (what ``log_model(...).model_uri`` returns in MLflow 3): that logged model;
          its run is the logged model's source run.
        - ``runs:/<run_id>/<path>``: like ``run_id`` + ``artifact_path`` below.
        - ``run_id`` alone: the run's artifacts at ``artifact_path`` when they hold an ``MLmodel``
          (MLflow 2 layout), else the logged model of that run named ``artifact_path`` (MLflow 3, where
          a run's artifacts no longer contain the model), as ``mlflow.register_model`` does.
        - any other URI (``s3://...``, ``models:/name/1``): used as given.

        :param run_id: the training run.
        :param model_uri: the model URI from the training result.
        :param artifact_path: the model's artifact path / logged model name inside the run.
        :raises MLflowRegistryError: run or logged model not found, or nothing at ``artifact_path``
            (the message lists what the run does hold).
        """
        from mlflow.exceptions import MlflowException

        if model_uri:
            if model_uri.startswith("runs:/"):
                uri_run_id, _, path = model_uri[len("runs:/") :].strip("/").partition("/")
                if not uri_run_id or not path:
                    raise MLflowRegistryError(
                        f"model_uri {model_uri!r} is not a proper runs:/ URI: expected runs:/<run_id>/<path>"
                    )
                self._check_same_run(run_id, uri_run_id, model_uri)
                return self._source_from_run(uri_run_id, path)
            model_id = self.logged_model_id(model_uri)
            if model_id:
                try:
                    logged = self._client.get_logged_model(model_id)
                except MlflowException as err:
                    if self._error_code(err) == "RESOURCE_DOES_NOT_EXIST":
                        raise MLflowRegistryError(
                            f"logged model {model_id!r} (model_uri {model_uri!r}) not found {self._where()}"
                        ) from err
                    raise
                if str(logged.status) == "FAILED":
                    raise MLflowRegistryError(
                        f"logged model {model_id!r} has status FAILED: its upload did not finish; "
                        "re-run the training task"
                    )
                self._check_same_run(run_id, logged.source_run_id, model_uri)
                return ModelSource(f"models:/{model_id}", run_id or logged.source_run_id, model_id)
            if run_id:
                self.get_run_or_raise(run_id)
            return ModelSource(model_uri, run_id, None)
        if not run_id:
            raise MLflowRegistryError(
                "neither run_id nor model_uri is set: cannot tell which model to register"
            )
        return self._source_from_run(run_id, artifact_path)

    @staticmethod
    def _check_same_run(run_id: str | None, uri_run_id: str | None, model_uri: str) -> None:
        if run_id and uri_run_id and run_id != uri_run_id:
            raise MLflowRegistryError(
                f"run_id {run_id!r} and model_uri {model_uri!r} (from run {uri_run_id!r}) disagree: "
                "pass the run_id and model_uri of the same training result"
            )

    def _source_from_run(self, run_id: str, artifact_path: str) -> ModelSource:
        run = self.get_run_or_raise(run_id)
        path = artifact_path.strip("/")
        artifacts = self.list_run_artifacts(run_id, path)
        if f"{path}/MLmodel" in artifacts:
            return ModelSource(f"{run.info.artifact_uri.rstrip('/')}/{path}", run_id, None)
        logged = [m for m in self.logged_models_of_run(run) if m.name == path and str(m.status) != "FAILED"]
        if logged:
            # Several models logged under one name (e.g. one per epoch): the newest is the result.
            newest = max(logged, key=lambda m: m.creation_timestamp or 0)
            return ModelSource(f"models:/{newest.model_id}", run_id, newest.model_id)
        root = self.list_run_artifacts(run_id)
        names = sorted({m.name for m in self.logged_models_of_run(run)})
        raise MLflowRegistryError(
            f"run {run_id!r} has no model at artifact path {path!r} {self._where()}: its artifacts are "
            f"{root or '(none)'} and its logged models are {names or '(none)'}; set artifact_path to "
            "one of them or pass the model_uri the training task returned"
        )

    def ensure_registered_model(self, name: str) -> bool:
        """Create the registered model unless it exists; True when this call created it.

        :param name: registered model name.
        """
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(name)
        except MlflowException as err:
            if self._error_code(err) in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                return False
            raise
        self.log.info("Created registered model %r %s", name, self._where())
        return True

    def find_model_version(self, name: str, source: ModelSource) -> ModelVersion | None:
        """The oldest version of ``name`` made from the same run and source, if any (failed ones ignored).

        :param name: registered model name.
        :param source: what the version was created from.
        """
        quoted = name.replace("'", "\\'")
        filter_string = f"name = '{quoted}'" + (f" and run_id = '{source.run_id}'" if source.run_id else "")
        matches: list[ModelVersion] = []
        page_token = None
        while True:
            page = self._client.search_model_versions(filter_string, page_token=page_token)
            matches.extend(
                v
                for v in page
                if v.source == source.source
                and v.run_id == source.run_id
                and str(v.status) != "FAILED_REGISTRATION"
            )
            page_token = page.token
            if not page_token:
                break
        return min(matches, key=lambda v: int(v.version)) if matches else None

    def wait_until_ready(
        self, name: str, version: str | int, timeout: float, poll_interval: float = 0.2
    ) -> ModelVersion:
        """Poll a model version until it is READY.

        :param name: registered model name.
        :param version: the version.
        :param timeout: seconds to wait at most.
        :param poll_interval: first pause between polls (doubles up to 2 s).
        :raises MLflowRegistryError: on FAILED_REGISTRATION (with MLflow's status message) or timeout.
        """
        import time

        deadline = time.monotonic() + timeout
        while True:
            version_ = self._client.get_model_version(name, str(version))
            status = str(version_.status)
            if status == "READY":
                return version_
            if status == "FAILED_REGISTRATION":
                raise MLflowRegistryError(
                    f"model {name!r} version {version} failed registration {self._where()}: "
                    f"{version_.status_message or 'no status message'}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MLflowRegistryError(
                    f"model {name!r} version {version} is still {status} after {timeout:g} s "
                    f"(await_ready_timeout) {self._where()}"
                )
            time.sleep(min(poll_interval, remaining))
            poll_interval = min(poll_interval * 2, 2.0)

    def register_model_version(
        self,
        name: str,
        source: ModelSource,
        *,
        tags: dict[str, str] | None = None,
        description: str | None = None,
        await_ready_timeout: float = 300,
    ) -> tuple[ModelVersion, bool]:
        """Register ``source`` as a version of ``name`` once: a retry finds the version it made before.

        Creates the registered model if missing, reuses a version with the same run and source (see
        :meth:`find_model_version`) or creates one, then waits until it is READY and applies ``tags`` and
        ``description``.

        :param name: registered model name.
        :param source: from :meth:`resolve_model_source`.
        :param tags: version tags.
        :param description: version description.
        :param await_ready_timeout: seconds to wait for READY.
        :return: the READY version and whether this call created it.
        """
        self.ensure_registered_model(name)
        existing = self.find_model_version(name, source)
        if existing is None:
            created = self._client.create_model_version(
                name,
                source.source,
                source.run_id,
                tags=tags,
                description=description,
                await_creation_for=0,  # waited for below, with a clear error on failure or timeout
                model_id=source.model_id,
            )
            version = created.version
            self.log.info("Created model %r version %s from %s", name, version, source.source)
        else:
            version = existing.version
            self.log.info(
                "Model %r version %s already holds %s (run %s): reusing it",
                name,
                version,
                source.source,
                source.run_id,
            )
        ready = self.wait_until_ready(name, version, await_ready_timeout)
        if existing is not None:
            for key, value in (tags or {}).items():
                if ready.tags.get(key) != value:
                    self._client.set_model_version_tag(name, str(version), key, value)
            if description is not None and ready.description != description:
                self._client.update_model_version(name, str(version), description=description)
            ready = self._client.get_model_version(name, str(version))
        return ready, existing is None

    def get_version_by_alias(self, name: str, alias: str) -> ModelVersion | None:
        """The version of ``name`` that holds ``alias``; None when the model or the alias does not exist.

        :param name: registered model name.
        :param alias: the alias, e.g. ``champion``.
        """
        from mlflow.exceptions import MlflowException

        try:
            registered = self._client.get_registered_model(name)
        except MlflowException as err:
            if self._error_code(err) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        version = (registered.aliases or {}).get(alias)
        return None if version is None else self._client.get_model_version(name, str(version))

    def move_alias(self, name: str, alias: str, version: str | int) -> str | None:
        """Point ``alias`` at ``version`` (the promotion) and record the previous holder for a rollback.

        The previous holder is written to the new version's tag ``mltrain.previous_version.<alias>``
        before the alias moves, so :meth:`rollback_alias` can undo it. Idempotent: when the alias is
        already on ``version`` the recorded previous holder is returned.

        :param name: registered model name.
        :param alias: the alias to move.
        :param version: the version that takes it.
        :return: the version that held the alias before (None for the first holder).
        """
        version = str(version)
        tag = self.PREVIOUS_VERSION_TAG.format(alias=alias)
        current = self.get_version_by_alias(name, alias)
        if current is not None and str(current.version) == version:
            previous = current.tags.get(tag) or None
            self.log.info(
                "Alias %r of model %r is already on version %s (previous holder: %s)",
                alias,
                name,
                version,
                previous,
            )
            return previous
        previous = None if current is None else str(current.version)
        if previous is not None:
            self._client.set_model_version_tag(name, version, tag, previous)
        self._client.set_registered_model_alias(name, alias, version)
        if previous is None:
            self.log.info("Alias %r of model %r set on version %s (no previous holder)", alias, name, version)
        else:
            self.log.info(
                "Alias %r of model %r moved from version %s to version %s; roll back with "
                "MLflowHook(%r).rollback_alias(%r, %r)",
                alias,
                name,
                previous,
                version,
                self.mlflow_conn_id,
                name,
                alias,
            )
        return previous

    def rollback_alias(self, name: str, alias: str) -> str:
        """Move ``alias`` back to the version recorded as its previous holder by :meth:`move_alias`.

        :param name: registered model name.
        :param alias: the alias.
        :return: the version that holds the alias now.
        :raises MLflowRegistryError: when the alias is not set or no previous holder is recorded.
        """
        current = self.get_version_by_alias(name, alias)
        if current is None:
            raise MLflowRegistryError(
                f"model {name!r} has no alias {alias!r} {self._where()}: nothing to roll back"
            )
        previous = current.tags.get(self.PREVIOUS_VERSION_TAG.format(alias=alias))
        if not previous:
            raise MLflowRegistryError(
                f"model {name!r} version {current.version} holds {alias!r} but records no previous holder "
                f"(tag {self.PREVIOUS_VERSION_TAG.format(alias=alias)!r}): nothing to roll back to"
            )
        self._client.set_registered_model_alias(name, alias, previous)
        self.log.info(
            "Alias %r of model %r rolled back from version %s to %s", alias, name, current.version, previous
        )
        return previous

    def set_legacy_stage(self, name: str, version: str | int, stage: str) -> None:
        """Transition a version to a registry stage (deprecated in MLflow since 2.9; aliases replace it).

        :param name: registered model name.
        :param version: the version.
        :param stage: ``Staging``, ``Production`` or ``Archived``.
        """
        import warnings

        with warnings.catch_warnings():
            # The operator already warned the DAG author at parse time; MLflow's own warning adds nothing.
            warnings.simplefilter("ignore", FutureWarning)
            self._client.transition_model_version_stage(name, str(version), stage)

    def get_run_metrics(self, run_id: str) -> dict[str, float]:
        """A run's metrics (the latest value of each).

        :param run_id: the run.
        :raises MLflowRegistryError: when the run does not exist.
        """
        return dict(self.get_run_or_raise(run_id).data.metrics)

    def get_champion(self, name: str, alias: str = "champion") -> dict[str, Any] | None:
        """The version holding ``alias`` and the metrics of the run behind it; None without a holder.

        :param name: registered model name.
        :param alias: the alias naming the champion.
        :return: ``{name, alias, version, run_id, metrics}`` or None when the model or alias does not exist.
        :raises MLflowRegistryError: when the version has neither a run nor a logged model to read metrics from.
        """
        version = self.get_version_by_alias(name, alias)
        if version is None:
            return None
        if version.run_id:
            metrics = self.get_run_metrics(version.run_id)
        elif version.model_id:
            logged = self._client.get_logged_model(version.model_id)
            metrics = {m.key: m.value for m in logged.metrics or []}
        else:
            raise MLflowRegistryError(
                f"model {name!r} version {version.version} holds alias {alias!r} but has no run or logged model "
                "to read its metrics from"
            )
        return {
            "name": name,
            "alias": alias,
            "version": str(version.version),
            "run_id": version.run_id,
            "metrics": metrics,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mlflow_conn_id={self.mlflow_conn_id!r})"


def connection_json(
    tracking_uri: str,
    *,
    login: str | None = None,
    password: str | None = None,
    **extra: Any,
) -> str:
    """A JSON connection definition for ``AIRFLOW_CONN_<ID>`` (handy in docs, tests and the demo).

    :param tracking_uri: the tracking URI (the connection's host).
    :param login: basic-auth user.
    :param password: basic-auth password.
    :param extra: extras such as ``token`` or ``registry_uri``.
    """
    conn: dict[str, Any] = {"conn_type": "mlflow", "host": tracking_uri}
    if login:
        conn["login"] = login
    if password:
        conn["password"] = password
    if extra:
        conn["extra"] = extra
    return json.dumps(conn)
