"""The model-registry half of :class:`~airflow_provider_mltrain.hooks.mlflow.MLflowHook`.

What MLflowRegisterOperator and ModelQualityBranchOperator need: find runs and logged models, register
a version idempotently, wait for READY, move aliases with a recorded previous holder, and read a
champion's metrics. Errors name the object and the server so a failed task says what to fix. Like the
hook, nothing here imports mlflow at module level.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow.exceptions import AirflowException

if TYPE_CHECKING:
    from airflow.sdk.types import Logger
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel, Run
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.utils.rest_utils import MlflowHostCreds


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


class MLflowRegistryMixin:
    """Registry operations on top of a hook's connection (``get_conn``, ``tracking_uri``)."""

    if TYPE_CHECKING:  # what the hook provides
        mlflow_conn_id: str

        @property
        def tracking_uri(self) -> str: ...

        @property
        def log(self) -> Logger: ...

        def get_conn(self) -> MlflowClient: ...

        def host_creds(self, uri: str | None = None) -> MlflowHostCreds: ...

        @staticmethod
        def _is_remote(uri: str) -> bool: ...

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
