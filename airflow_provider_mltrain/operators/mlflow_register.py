"""MLflowRegisterOperator: register a training result in the MLflow model registry and promote it."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.exceptions import AirflowProviderDeprecationWarning
from airflow.sdk import BaseOperator

from airflow_provider_mltrain._templating import renders_later
from airflow_provider_mltrain.hooks.mlflow import MLflowHook, MLflowRegistryError
from airflow_provider_mltrain.links.mlflow import MLflowModelVersionLink
from airflow_provider_mltrain.operators._mlflow_names import (
    validate_alias,
    validate_model_name,
    validate_stage,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


class MLflowRegisterOperator(BaseOperator):
    """Register a trained model as a version of a registered model, wait until it is READY, move aliases.

    Idempotent: a retry (or a re-run with the same run and source) finds the version it created before
    instead of creating a duplicate. Moving an alias is the promotion: the version that held it before is
    recorded in the new version's tag ``mltrain.previous_version.<alias>`` and in the log, so
    ``MLflowHook(conn_id).registry.rollback_alias(name, alias)`` undoes it in one call.

    Returns (XCom) ``{name, version, model_uri ("models:/<name>/<version>"), aliases, run_id,
    previous_champion, previous_versions, source, created}``: ``previous_champion`` is the version that held
    the first alias before (None for the first holder), ``previous_versions`` maps every alias to its
    previous holder, ``version`` is a string as in MLflow.

    .. code-block:: python

        register = MLflowRegisterOperator(
            task_id="register",
            model_name="digits-classifier",
            run_id=train.output["run_id"],
            model_uri=train.output["model_uri"],
            aliases=["champion"],
        )

    :param model_name: registered model name; created if missing (templated).
    :param run_id: the training run (templated; usually ``train.output["run_id"]``).
    :param model_uri: the logged model's URI, e.g. ``models:/m-...`` from ``log_model(...).model_uri`` or
        ``runs:/<run_id>/model`` (templated; usually ``train.output["model_uri"]``). Without it the model
        is looked up in ``run_id`` under ``artifact_path``.
    :param artifact_path: the model's artifact path / logged model name inside the run.
    :param aliases: aliases the new version takes, e.g. ``["champion"]``.
    :param tags: model version tags (templated).
    :param description: model version description (templated).
    :param await_ready_timeout: seconds to wait for the version to become READY.
    :param stage: legacy registry stage (``Staging``, ``Production``, ``Archived``); deprecated by MLflow
        since 2.9 in favour of aliases, so it warns.
    :param mlflow_conn_id: the MLflow connection.
    """

    template_fields: Sequence[str] = ("model_name", "run_id", "model_uri", "tags", "description")
    operator_extra_links = (MLflowModelVersionLink(),)
    ui_color = "#d5e8f7"

    def __init__(
        self,
        *,
        model_name: str,
        run_id: str | None = None,
        model_uri: str | None = None,
        artifact_path: str = "model",
        aliases: str | Sequence[str] | None = None,
        tags: dict[str, Any] | None = None,
        description: str | None = None,
        await_ready_timeout: float = 300,
        stage: str | None = None,
        mlflow_conn_id: str = MLflowHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not renders_later(model_name):
            validate_model_name(model_name)
        if not run_id and not model_uri:
            raise ValueError(
                "set run_id and/or model_uri (usually train.output['run_id'] / train.output['model_uri']): "
                f"got run_id={run_id!r}, model_uri={model_uri!r}"
            )
        for param, value in (("run_id", run_id), ("model_uri", model_uri)):
            if value is not None and not renders_later(value) and not isinstance(value, str):
                raise ValueError(f"{param} must be a string, got {type(value).__name__}: {value!r}")
        if not isinstance(artifact_path, str) or not artifact_path.strip("/ "):
            raise ValueError(
                f"artifact_path must be a non-empty relative path such as 'model', got {artifact_path!r}"
            )
        if aliases is not None and not isinstance(aliases, (str, list, tuple)):
            raise ValueError(
                f"aliases={aliases!r} is invalid: expected an alias string (e.g. 'champion'), a list of "
                "them, or None"
            )
        alias_list = [aliases] if isinstance(aliases, str) else list(aliases or [])
        for alias in alias_list:
            validate_alias(alias, "aliases")
        if tags is not None and not renders_later(tags):
            if not isinstance(tags, dict):
                raise ValueError(f"tags must be a dict of name -> value, got {type(tags).__name__}")
            for key in tags:
                if not isinstance(key, str) or not key.strip():
                    raise ValueError(f"tags: keys must be non-empty strings, got {key!r}")
        if (
            isinstance(await_ready_timeout, bool)
            or not isinstance(await_ready_timeout, (int, float))
            or not await_ready_timeout > 0
        ):
            raise ValueError(
                f"await_ready_timeout must be a positive number of seconds, got {await_ready_timeout!r}"
            )
        if stage is not None:
            stage = validate_stage(stage)
            warnings.warn(
                f"MLflowRegisterOperator(stage={stage!r}): model registry stages are deprecated since MLflow "
                "2.9; use aliases=[...] instead (e.g. aliases=['champion'])",
                AirflowProviderDeprecationWarning,
                stacklevel=2,
            )
        self.model_name = model_name
        self.run_id = run_id
        self.model_uri = model_uri
        self.artifact_path = artifact_path.strip("/ ")
        self.aliases = list(dict.fromkeys(alias_list))
        self.tags = tags
        self.description = description
        self.await_ready_timeout = float(await_ready_timeout)
        self.stage = stage
        self.mlflow_conn_id = mlflow_conn_id

    @functools.cached_property
    def hook(self) -> MLflowHook:
        """The task's one MLflow hook: one connection look-up and one client per execution."""
        return MLflowHook(self.mlflow_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        # The link's XCom exists from the start, so a failed try ends without an "XCom not found" error.
        MLflowModelVersionLink.persist(context, "")
        name = validate_model_name(self.model_name)
        run_id = self._rendered_str("run_id", self.run_id)
        model_uri = self._rendered_str("model_uri", self.model_uri)
        if not run_id and not model_uri:
            raise MLflowRegistryError(
                "run_id and model_uri both rendered empty: the upstream training result carries no model to "
                "register (check the training task's XCom 'run_id' / 'model_uri')"
            )
        tags = {str(key): str(value) for key, value in (self.tags or {}).items()}
        self.hook.ping()
        registry = self.hook.registry
        source = registry.resolve_model_source(
            run_id=run_id, model_uri=model_uri, artifact_path=self.artifact_path
        )
        version, created = registry.register_model_version(
            name,
            source,
            tags=tags,
            description=self.description,
            await_ready_timeout=self.await_ready_timeout,
        )
        previous = {alias: registry.move_alias(name, alias, version.version) for alias in self.aliases}
        if self.stage:
            registry.set_legacy_stage(name, version.version, self.stage)
        MLflowModelVersionLink.persist(context, self.hook.model_version_url(name, version.version))
        result = {
            "name": name,
            "version": str(version.version),
            "model_uri": f"models:/{name}/{version.version}",
            "aliases": list(self.aliases),
            "run_id": source.run_id,
            "previous_champion": previous[self.aliases[0]] if self.aliases else None,
            "previous_versions": previous,
            "source": source.source,
            "created": created,
        }
        self.log.info(
            "%s model %r version %s from %s%s",
            "Registered" if created else "Found already registered",
            name,
            version.version,
            source.source,
            "".join(f"; alias {a!r} (previous holder: {p})" for a, p in previous.items()),
        )
        return result

    @staticmethod
    def _rendered_str(param: str, value: Any) -> str | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise MLflowRegistryError(
                f"{param} rendered to a {type(value).__name__}, not a string: {value!r:.200}"
            )
        text = value.strip()
        return text or None
