"""The model registry an :class:`~airflow_provider_mltrain.hooks.mlflow.MLflowHook` owns (``hook.registry``).

What MLflowRegisterOperator and ModelQualityBranchOperator need: find runs and logged models, register
a version idempotently, wait for READY, move aliases with a recorded previous holder, and read a
champion's metrics. Errors name the object and the server so a failed task says what to fix. Like the
hook, nothing here imports mlflow at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
import uuid
from collections.abc import Callable, Iterator
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
    """What a model version is created from (see :meth:`MLflowRegistry.resolve_model_source`).

    :param source: the version's source URI (``models:/m-...`` for an MLflow 3 logged model).
    :param run_id: the run that produced it (None when unknown).
    :param model_id: the MLflow 3 logged model id (None for a plain artifact location).
    """

    source: str
    run_id: str | None
    model_id: str | None


def filter_literal(value: str) -> str:
    """``value`` as a string literal of MLflow's search filter grammar.

    MLflow's filter parser has no escape character: a value is wrapped in single or double quotes and
    taken verbatim, so a name holding one kind of quote is wrapped in the other. ``\\'`` (the previous
    spelling) matched nothing, which made every retry of a name with ``'`` create a new version.

    :param value: the literal value.
    :raises MLflowRegistryError: when ``value`` holds both quote kinds (no literal can carry it; model
        names are refused at parse time for that reason, see ``operators._mlflow_names``).
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise MLflowRegistryError(
        f"{value!r} holds both ' and \": MLflow's search filter cannot express it; rename it"
    )


class MLflowRegistry:
    """Registry operations on one MLflow connection, built and owned by its hook (``MLflowHook.registry``).

    It is given what it needs rather than the hook itself, so this module does not import the hook's
    module (which imports this one).

    :param client: the connection's ``MlflowClient`` (from ``MLflowHook.get_conn``); one client serves
        every registry step of a task, and it holds no state that could go stale within one.
    :param conn_id: the Airflow connection id, named in error messages.
    :param tracking_uri: the tracking URI (no credentials in it), named in error messages.
    :param tracking_creds: the tracking server's credentials for its REST API; None for a local store,
        which is read through MLflow's artifact repositories instead.
    :param registry_is_remote: whether the registry is a tracking server (it resolves ``models:/m-...``
        sources and links logged models itself) rather than a local store.
    :param log: the logger the registry steps log to (the hook's).
    """

    #: Version tag naming the version that held ``alias`` before this version took it (rollback target).
    PREVIOUS_VERSION_TAG = "mltrain.previous_version.{alias}"

    def __init__(
        self,
        client: MlflowClient,
        *,
        conn_id: str,
        tracking_uri: str,
        tracking_creds: Callable[[], MlflowHostCreds] | None,
        registry_is_remote: bool,
        log: Logger,
    ) -> None:
        self._client = client
        self.conn_id = conn_id
        self.tracking_uri = tracking_uri
        self.tracking_creds = tracking_creds
        self.registry_is_remote = registry_is_remote
        self.log = log

    def _where(self) -> str:
        return f"on {self.tracking_uri} (connection {self.conn_id!r})"

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
        if self.tracking_creds is None:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            # The run's own artifact repository, as mlflow.register_model reads it: MLflow 3's
            # MlflowClient.list_artifacts falls back to a logged model's files when the run has none at
            # `path`, which made a LoggedModel look like a model in the run's artifacts (a source that
            # does not exist).
            repo = get_artifact_repository(self.get_run_or_raise(run_id).info.artifact_uri)
            return [f.path + ("/" if f.is_dir else "") for f in repo.list_artifacts(path)]
        from mlflow.utils.rest_utils import http_request

        params = {"run_id": run_id, **({"path": path} if path else {})}
        response = http_request(self.tracking_creds(), "/api/2.0/mlflow/artifacts/list", "GET", params=params)
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
                return self._logged_model_source(logged, run_id or logged.source_run_id)
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

    def _logged_model_source(self, logged: LoggedModel, run_id: str | None) -> ModelSource:
        """The version source for an MLflow 3 logged model, with its ``model_id`` (as ``register_model``).

        A tracking server resolves ``models:/m-...`` itself. MLflow's SQL registry store (the embedded
        default) resolves it through ``MlflowClient()``, a client on the *process-global* tracking URI
        (MLflow's own TODO in ``create_model_version``), which a hook bound to a connection cannot rely
        on: there the source is the logged model's artifact location, the same files ``models:/m-...``
        names, so ``models:/<name>@<alias>`` loads on both stores.
        """
        if self.registry_is_remote:
            return ModelSource(f"models:/{logged.model_id}", run_id, logged.model_id)
        return ModelSource(str(logged.artifact_location), run_id, logged.model_id)

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
            return self._logged_model_source(newest, run_id)
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
        filter_string = f"name = {filter_literal(name)}" + (
            f" and run_id = {filter_literal(source.run_id)}" if source.run_id else ""
        )
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
        ``description``. Calls that race on one source end with one version (see :meth:`_drop_if_duplicate`).

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
            existing = self._drop_if_duplicate(name, source, str(version))
            if existing is None and source.model_id and not self.registry_is_remote:
                # A tracking server records this itself when given the model_id.
                self._link_logged_model(source.model_id, name, str(version))
        if existing is not None:
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

    def _link_logged_model(self, model_id: str, name: str, keep: str, *, drop: str | None = None) -> None:
        """List version ``keep`` (and not ``drop``) in the logged model's tag ``mlflow.modelVersions``.

        That tag is what links a logged model to its registered versions (MLflow's SQL registry stores keep
        no ``model_id`` on a version); ``mlflow.register_model`` and a tracking server maintain it. Best
        effort: the registration stands without it.

        :param model_id: the logged model.
        :param name: registered model name.
        :param keep: the version to list.
        :param drop: a version to remove from the list (a deleted duplicate).
        """
        import json

        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        try:
            logged = self._client.get_logged_model(model_id)
            entries = [
                e
                for e in json.loads(logged.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
                if (e.get("name"), str(e.get("version"))) not in ((name, keep), (name, drop))
            ]
            entries.append({"name": name, "version": keep})
            self._client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(entries)})
        except Exception as err:
            self.log.warning(
                "Could not link logged model %s to model %r version %s: %s", model_id, name, keep, err
            )

    def _drop_if_duplicate(self, name: str, source: ModelSource, version: str) -> ModelVersion | None:
        """After creating ``version``: the older version of the same source, if a concurrent call made one.

        Two registrations of one source that run at the same time both find nothing and both create a
        version. Version numbers are handed out in commit order, so the lowest number of a source was
        visible to every later creator when it looked again here: each keeps the lowest and the loser
        deletes its own version, so both return the same single version whatever the interleaving.

        :return: the version to use instead of ``version`` (None when ``version`` is the one to keep).
        """
        oldest = self.find_model_version(name, source)
        if oldest is None or str(oldest.version) == version:
            return None
        self.log.info(
            "Model %r version %s holds the same source %s (registered concurrently): deleting version "
            "%s and using version %s",
            name,
            oldest.version,
            source.source,
            version,
            oldest.version,
        )
        try:
            self._client.delete_model_version(name, version)
        except Exception as err:  # the duplicate is harmless; failing the task for it would not be
            self.log.warning("Could not delete duplicate model %r version %s: %s", name, version, err)
            return oldest
        if source.model_id:
            # A tracking server listed both versions (or, racing, only the deleted one).
            self._link_logged_model(source.model_id, name, str(oldest.version), drop=version)
        return oldest

    # -- alias moves -------------------------------------------------------------------------------
    #
    # MLflow has no compare-and-set on aliases: "read the holder, record it, set the alias" run by two
    # tasks at once lets both read the same holder, so one promotion is lost and the record is wrong, and
    # no re-read afterwards can tell (the later set looks like a clean move). An optimistic retry needs a
    # conditional write the registry does not offer. The one atomic create-if-absent it does offer is
    # creating a registered model (its name is unique), so an alias move runs under a lock that is a
    # registered model named after (model, alias): created to acquire, deleted to release. A lock left by
    # a worker that died holding it is broken after ALIAS_LOCK_STALE_S (a move takes well under a
    # second); a waiter gives up after ALIAS_LOCK_TIMEOUT_S with the lock's name in the error.

    #: Prefix of the lock models; the rest is a digest, so any model name and alias fit MLflow's limits.
    ALIAS_LOCK_PREFIX = "mltrain-alias-lock-"
    ALIAS_LOCK_OWNER_TAG = "mltrain.lock.owner"
    ALIAS_LOCK_TIMEOUT_S = 120.0
    ALIAS_LOCK_STALE_S = 300.0

    @classmethod
    def alias_lock_name(cls, name: str, alias: str) -> str:
        """The registered model that serialises moves of ``alias`` of ``name``.

        :param name: registered model name.
        :param alias: the alias.
        """
        digest = hashlib.sha256(f"{name}\0{alias}".encode()).hexdigest()[:32]
        return cls.ALIAS_LOCK_PREFIX + digest

    @contextlib.contextmanager
    def alias_lock(self, name: str, alias: str) -> Iterator[None]:
        """Hold the lock on moves of ``alias`` of ``name`` for the block (see the comment above).

        :param name: registered model name.
        :param alias: the alias.
        :raises MLflowRegistryError: when the lock stays taken for ``ALIAS_LOCK_TIMEOUT_S``.
        """
        from mlflow.exceptions import MlflowException

        lock = self.alias_lock_name(name, alias)
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + self.ALIAS_LOCK_TIMEOUT_S
        pause = 0.05
        while True:
            try:
                self._client.create_registered_model(
                    lock,
                    tags={self.ALIAS_LOCK_OWNER_TAG: owner},
                    description=f"mltrain: lock on moves of alias {alias!r} of model {name!r}; "
                    "deleted when the move ends",
                )
                break
            except MlflowException as err:
                # RESOURCE_DOES_NOT_EXIST: MLflow's SQL store answers a duplicate name by looking the
                # existing model up, which fails when its holder released it in between: taken, retry.
                if self._error_code(err) not in (
                    "RESOURCE_ALREADY_EXISTS",
                    "ALREADY_EXISTS",
                    "RESOURCE_DOES_NOT_EXIST",
                ):
                    raise
            self._break_stale_lock(lock)
            if time.monotonic() > deadline:
                raise MLflowRegistryError(
                    f"alias {alias!r} of model {name!r} stayed locked for {self.ALIAS_LOCK_TIMEOUT_S:g} s "
                    f"by registered model {lock!r} {self._where()}: another registration is moving it; "
                    "if none is running, delete that registered model"
                )
            # Jitter keeps waiters from retrying in lockstep.
            time.sleep(pause * (1 + random.random()))
            pause = min(pause * 2, 1.0)
        try:
            yield
        finally:
            self._release_lock(lock, owner)

    def _break_stale_lock(self, lock: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            held = self._client.get_registered_model(lock)
        except MlflowException:
            return  # released meanwhile
        age_s = time.time() - (held.creation_timestamp or 0) / 1000
        if age_s > self.ALIAS_LOCK_STALE_S:
            self.log.warning("Breaking alias lock %r held for %.0f s (its holder died)", lock, age_s)
            with contextlib.suppress(MlflowException):
                self._client.delete_registered_model(lock)

    def _release_lock(self, lock: str, owner: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            held = self._client.get_registered_model(lock)
            # Only our own lock: after a stale break another holder may own the name now.
            if held.tags.get(self.ALIAS_LOCK_OWNER_TAG) == owner:
                self._client.delete_registered_model(lock)
        except MlflowException as err:
            self.log.warning("Could not release alias lock %r: %s", lock, err)

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
        with self.alias_lock(name, alias):
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
            elif tag in self._client.get_model_version(name, version).tags:
                # A record from an earlier promotion of this version would name a wrong rollback target.
                self._client.delete_model_version_tag(name, version, tag)
            self._client.set_registered_model_alias(name, alias, version)
        if previous is None:
            self.log.info("Alias %r of model %r set on version %s (no previous holder)", alias, name, version)
        else:
            self.log.info(
                "Alias %r of model %r moved from version %s to version %s; roll back with "
                "MLflowHook(%r).registry.rollback_alias(%r, %r)",
                alias,
                name,
                previous,
                version,
                self.conn_id,
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
        with self.alias_lock(name, alias):
            current = self.get_version_by_alias(name, alias)
            if current is None:
                raise MLflowRegistryError(
                    f"model {name!r} has no alias {alias!r} {self._where()}: nothing to roll back"
                )
            previous = current.tags.get(self.PREVIOUS_VERSION_TAG.format(alias=alias))
            if not previous:
                raise MLflowRegistryError(
                    f"model {name!r} version {current.version} holds {alias!r} but records no previous "
                    f"holder (tag {self.PREVIOUS_VERSION_TAG.format(alias=alias)!r}): nothing to roll back to"
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
