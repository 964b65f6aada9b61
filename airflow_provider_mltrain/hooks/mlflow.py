"""MLflowHook: an Airflow connection type for MLflow tracking servers.

Nothing here imports mlflow at module level: this module is imported on every DAG parse that uses an
operator of this provider, and mlflow costs hundreds of milliseconds to import.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from airflow.exceptions import AirflowException
from airflow.sdk.bases.hook import BaseHook

# MLflowRegistry, MLflowRegistryError and ModelSource are part of this module's API; they live with the
# registry code.
from airflow_provider_mltrain.hooks._mlflow_registry import MLflowRegistry as MLflowRegistry
from airflow_provider_mltrain.hooks._mlflow_registry import MLflowRegistryError as MLflowRegistryError
from airflow_provider_mltrain.hooks._mlflow_registry import ModelSource as ModelSource
from gpu_trainer import contract

if TYPE_CHECKING:
    from mlflow import MlflowClient
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
    :meth:`child_environment` hands them to a subprocess's environment only. Model registry operations
    (register a version, move or roll back an alias, read the champion) are on :attr:`registry`.

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
            env_var = f"AIRFLOW_CONN_{self.mlflow_conn_id.upper()}"
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r} is not defined here: create it in the UI or "
                f"set {env_var}='mlflow://...' (see the README). If it exists in the Airflow database: "
                "Airflow 3 reads database connections only inside a running task (through the API "
                "server); outside one (a Python shell, a script, a test) only AIRFLOW_CONN_* variables "
                "and secrets backends are seen. To check a database connection, use the UI's Test "
                f"button or `airflow connections test {self.mlflow_conn_id}` (both need [core] "
                f"test_connection = Enabled), or `airflow tasks test` a task that uses it; in a "
                f"script, export {env_var}."
            ) from err
        extra = conn.extra_dejson
        tracking_uri, url_login, url_password = self._tracking_uri(conn.host or "", conn.schema, conn.port)
        login, password = conn.login or None, conn.password or None
        if url_login or url_password:
            if login or password:
                raise MLflowConnectionError(
                    f"MLflow connection {self.mlflow_conn_id!r}: host {tracking_uri!r} carries credentials "
                    "(user:password@) and login/password are set too; keep them in login/password only"
                )
            # Credentials in the URL are used as login/password, so the tracking URI that reaches pod
            # specs, child environments, logs, XCom and links never carries them.
            login, password = url_login, url_password
            self.log.warning(
                "MLflow connection %r: credentials in the host URL are used as login/password; move them "
                "into the connection's login/password fields",
                self.mlflow_conn_id,
            )
        token = extra.get("token") or None
        # Registered so a value that reaches a log line is printed as '***'.
        for secret in (password, token):
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
        if token and (login or password):
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r}: set either login/password or the 'token' "
                "extra, not both"
            )
        registry_uri = extra.get("registry_uri") or tracking_uri
        for field in ("registry_uri", "ui_url"):
            self._refuse_url_credentials(field, extra.get(field) or "")
        self._check_uri("registry_uri", registry_uri)
        return {
            "tracking_uri": tracking_uri,
            "registry_uri": registry_uri,
            "username": login,
            "password": password,
            "token": token,
            "insecure": bool(insecure),
            "ca_bundle": ca_bundle,
            "ui_url": (extra.get("ui_url") or (tracking_uri if self._is_remote(tracking_uri) else "")).rstrip(
                "/"
            ),
        }

    def _tracking_uri(
        self, host: str, schema: str | None, port: int | None
    ) -> tuple[str, str | None, str | None]:
        """The tracking URI without credentials, and the user and password the URL carried (if any)."""
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
        login, password = None, None
        parts = urlsplit(host)
        if parts.scheme in REMOTE_SCHEMES and "@" in parts.netloc:
            userinfo, _, hostport = parts.netloc.rpartition("@")
            raw_login, _, raw_password = userinfo.partition(":")
            login, password = unquote(raw_login) or None, unquote(raw_password) or None
            # Masked before any message can quote the host; both spellings may reach a log line.
            for secret in {password, raw_password} - {None, ""}:
                self._mask(str(secret))
            host = urlunsplit(parts._replace(netloc=hostport))
        self._check_uri("host", host)
        return host.rstrip("/"), login, password

    def _refuse_url_credentials(self, field: str, uri: str) -> None:
        parts = urlsplit(uri.strip())
        if parts.scheme in REMOTE_SCHEMES and "@" in parts.netloc:
            userinfo, _, hostport = parts.netloc.rpartition("@")
            self._mask(userinfo.partition(":")[2])
            safe = urlunsplit(parts._replace(netloc=f"***@{hostport}"))
            raise MLflowConnectionError(
                f"MLflow connection {self.mlflow_conn_id!r}: extra {field!r} ({safe}) carries credentials; "
                "remove them from the URL (the connection's login/password are used for every URI)"
            )

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

    @functools.cached_property
    def registry(self) -> MLflowRegistry:
        """The model registry of this connection: one per hook, with one client for all its steps."""
        s = self._settings
        return MLflowRegistry(
            self.get_conn(),
            conn_id=self.mlflow_conn_id,
            tracking_uri=s["tracking_uri"],
            tracking_creds=self.host_creds if self._is_remote(s["tracking_uri"]) else None,
            registry_is_remote=self._is_remote(s["registry_uri"]),
            log=self.log,
        )

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
        # The contract's names: contract.trainer_environment accepts exactly these.
        env = {contract.ENV_TRACKING_URI: s["tracking_uri"]}
        if s["registry_uri"] != s["tracking_uri"]:
            env[contract.ENV_REGISTRY_URI] = s["registry_uri"]
        if s["username"]:
            env[contract.ENV_TRACKING_USERNAME] = s["username"]
        if s["password"]:
            env[contract.ENV_TRACKING_PASSWORD] = s["password"]
        if s["token"]:
            env[contract.ENV_TRACKING_TOKEN] = s["token"]
        if s["insecure"]:
            env[contract.ENV_TRACKING_INSECURE_TLS] = "true"
        if s["ca_bundle"]:
            env[contract.ENV_TRACKING_SERVER_CERT_PATH] = s["ca_bundle"]
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
