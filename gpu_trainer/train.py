"""``python -m gpu_trainer.train``: train a classifier on Parquet data, track it in MLflow, resume on retry.

The loop follows nanoGPT's shape: a typed config, the model in its own module, a checkpoint dict that
holds everything needed to resume exactly, only rank 0 logging and saving, autocast and
``zero_grad(set_to_none=True)``. :func:`_train` reads as nanoGPT's does: prepare and restore, the epoch
loop, finalize. See :mod:`gpu_trainer.config` for the options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.nn.functional as F

from gpu_trainer import checkpoint, contract, preemption, runtime
from gpu_trainer.config import TrainConfig, resolve_config
from gpu_trainer.data import Dataset, Split, epoch_indices, iterate_batches, load_dataset, pin
from gpu_trainer.errors import TrainerError, run_cli
from gpu_trainer.metrics import Evaluation, score_split
from gpu_trainer.models import build_model

if TYPE_CHECKING:
    from gpu_trainer.tracking import Tracker

log = logging.getLogger("gpu_trainer")

#: Keep a dataset on the GPU when it takes less than this share of free device memory.
_DEVICE_RESIDENT_SHARE = 0.25


@dataclasses.dataclass
class TrainOutcome:
    """What :func:`train` returns (rank 0 also wrote it as the result JSON).

    :param result: the contract result (None on ranks other than 0).
    :param loop_seconds: wall time of the epoch loop (training, validation, checkpoints, metric logging);
        the last epoch's checkpoint write is not in it: it overlaps the model upload in the finalize step.
    :param samples_trained: training samples processed in this process's loop, all ranks together.
    """

    result: dict[str, Any] | None
    loop_seconds: float
    samples_trained: int


def _make_optimizer(cfg: TrainConfig, params: Any, device: torch.device) -> torch.optim.Optimizer:
    # Building any torch.optim optimizer imports torch._dynamo (about a second, the whole "model +
    # optimizer build" phase of tests/benchmarks/bench_trainer_phases.py, the plain loop's too): in torch
    # 2.13 Optimizer.__init__ calls add_param_group, which torch._disable_dynamo wraps, and that wrapper
    # imports torch._dynamo on its first call (torch/_compile.py); step() imports it as well
    # (_use_grad_for_differentiable). foreach/fused change neither. It is not avoidable here: the model is
    # logged in MLflow's pt2 format, and torch.export needs torch._dynamo anyway.
    # Fused kernels update all parameters in one launch on CUDA; CPU keeps the default (foreach) path.
    fused = True if device.type == "cuda" else None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _place(split: Split, device: torch.device) -> Split:
    """On CUDA: the whole split on the device when it fits comfortably, else pinned host memory."""
    if device.type != "cuda":
        return split
    size = split.features.nbytes + split.labels.nbytes
    free, _total = torch.cuda.mem_get_info(device)
    if size < free * _DEVICE_RESIDENT_SHARE:
        return Split(split.features.to(device), split.labels.to(device))
    return pin(split)


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _config_record(cfg: TrainConfig, precision: str, dataset: Dataset) -> dict[str, Any]:
    record = cfg.params()
    record["precision"] = precision
    record["data_signature"] = dataset.signature()
    return record


def train(
    cfg: TrainConfig,
    environ: Mapping[str, str] | None = None,
    *,
    notice: preemption.StopNotice | None = None,
) -> TrainOutcome:
    """Run (or resume) one training job as described by ``cfg``.

    :param cfg: the resolved configuration.
    :param environ: the environment (``MLTRAIN_LINEAGE``, torchrun's variables); ``os.environ`` when None.
    :param notice: the process's SIGTERM notice (the entry point installs it); None never stops early.
    :raises TrainerError: for bad data, incompatible or unreadable checkpoints, divergence.
    :raises preemption.TrainingPreempted: after a SIGTERM, once the checkpoint of the step every rank
        stopped after is written and the MLflow run is marked KILLED.
    """
    env = os.environ if environ is None else environ
    info = runtime.dist_info(env)
    runtime.setup_logging(info)
    device = runtime.pick_device(cfg.device, info)
    runtime.init_distributed(info, device)
    try:
        return _train(cfg, env, info, device, notice)
    finally:
        if info.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclasses.dataclass
class _Job:
    """What stays fixed while the epochs run: the configuration, where it runs, the data, the model and
    the helpers around it (built by :func:`_prepare`).

    :param core: the bare model; checkpoints, validation and the logged model use it.
    :param model: ``core`` as the training step calls it (wrapped in DDP and/or ``torch.compile``).
    :param record: the configuration a checkpoint must match to be resumed (:func:`_config_record`).
    :param tracker: MLflow tracking; rank 0 only (None elsewhere).
    :param writer: the background checkpoint writer; rank 0 with a checkpoint directory only.
    :param vote: decides, the same on every rank, when a SIGTERM stops training.
    :param cpu_group: a gloo process group for small host-side collectives (per-rank checkpoint
        state); None in a single process.
    """

    cfg: TrainConfig
    info: runtime.DistInfo
    device: torch.device
    precision: str
    amp_dtype: torch.dtype | None
    dataset: Dataset
    record: dict[str, Any]
    core: torch.nn.Module
    model: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_split: Split
    val_split: Split
    batches_per_epoch: int
    tracker: Tracker | None
    writer: checkpoint.CheckpointWriter | None
    vote: preemption.StopVote
    cpu_group: Any = None


@dataclasses.dataclass
class _Progress:
    """Where training stands: restored from a checkpoint, advanced by each epoch, saved in checkpoints.

    :param epoch: epochs completed when restored (where the epoch loop starts).
    :param skip_batches: steps of that epoch already trained (a mid-epoch checkpoint); 0 once it ran.
    :param partial: the interrupted epoch's running loss sum and sample count.
    :param resumed_from: the epoch the run resumed from, None for a fresh run.
    :param resumed_state: the checkpoint resumed from; its RNG state continues an interrupted epoch.
    :param pending_metrics: metric rows an earlier try could not deliver (tracking was down).
    :param last_eval: rank 0's latest validation in this process (None until an epoch ran here).
    :param samples_trained: training samples processed in this process, all ranks together.
    :param epoch_times: wall time of each epoch run here (for the ETA).
    """

    epoch: int = 0
    skip_batches: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    partial: dict[str, Any] = dataclasses.field(default_factory=lambda: {"loss_sum": 0.0, "count": 0})
    run_id: str | None = None
    resumed_from: int | None = None
    resumed_state: dict[str, Any] | None = None
    pending_metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_eval: Evaluation | None = None
    samples_trained: int = 0
    epoch_times: list[float] = dataclasses.field(default_factory=list)


def _train(
    cfg: TrainConfig,
    env: Mapping[str, str],
    info: runtime.DistInfo,
    device: torch.device,
    notice: preemption.StopNotice | None,
) -> TrainOutcome:
    """Prepare (data, model, restore, tracking), then the epoch loop, then finalize."""
    job, progress = _prepare(cfg, env, info, device, notice)
    loop_start = time.perf_counter()
    try:
        for epoch in range(progress.epoch, cfg.epochs):
            _run_epoch(job, progress, epoch)
        if job.vote.settle():
            # SIGTERM during the last epoch's validation: its checkpoint is the one to resume from.
            _stop_preempted(job, progress, None)
        # The last epoch's checkpoint is still being written: _finalize waits for it after the model
        # upload, which it overlaps (on a large model both take seconds).
        loop_seconds = time.perf_counter() - loop_start
        return _finalize(job, progress, loop_seconds)
    except preemption.TrainingPreempted:
        if job.tracker is not None:
            # KILLED is MLflow's status for an interrupted run; the restart reopens it (RUNNING again).
            job.tracker.end_quietly(status="KILLED")
        raise
    except BaseException:
        if job.writer is not None:
            # Let a checkpoint in flight land: the retry resumes from it. Its own error would only
            # hide the one being raised.
            with contextlib.suppress(Exception):
                job.writer.wait()
        if job.tracker is not None:
            job.tracker.end_quietly(status="FAILED")
        raise


def _prepare(
    cfg: TrainConfig,
    env: Mapping[str, str],
    info: runtime.DistInfo,
    device: torch.device,
    notice: preemption.StopNotice | None,
) -> tuple[_Job, _Progress]:
    """Load the data, build the model and optimizer, restore the latest checkpoint, start tracking."""
    lineage = contract.parse_lineage(env.get(contract.ENV_LINEAGE))
    precision = runtime.resolve_precision(cfg.precision, device)
    amp_dtype = runtime.autocast_dtype(precision)
    runtime.configure_cuda()
    # A first line before the slow part (data, then MLflow's import and run): the task log shows the
    # trainer started instead of staying silent for the whole start-up.
    log.info("loading %s (%s on %s)", cfg.data, cfg.model, device)
    dataset = load_dataset(
        cfg.data,
        label_column=cfg.label_column,
        feature_columns=cfg.feature_columns,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
    )
    record = _config_record(cfg, precision, dataset)

    # Same seed on every rank for the initial weights (DDP also broadcasts rank 0's, this keeps them equal
    # without relying on it).
    runtime.seed_everything(cfg.seed)
    core = build_model(cfg.model, dataset.num_features, dataset.num_classes, cfg.hidden_dim)
    standardize = getattr(core, "standardize", None)
    if standardize is not None:
        standardize.fit(dataset.train.features)
    core.to(device)
    if device.type == "cuda" and cfg.model == "cnn":
        core.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = _make_optimizer(cfg, core.parameters(), device)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    progress = _restore(cfg, record, core, optimizer, scaler, info)

    model: Any = core
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        model = torch.compile(model)

    tracker = None
    if info.is_main:
        tracker = _start_tracking(cfg, env, info, device, precision, lineage, progress)

    train_split = _place(dataset.train, device)
    val_split = _place(dataset.val, device)
    batches_per_epoch = math.ceil(math.ceil(len(train_split) / info.world_size) / cfg.batch_size)
    log.info(
        "training %s on %s (%s, world size %d): %d train / %d val rows, %d features, %d classes, "
        "%d epochs x %d steps",
        cfg.model,
        device,
        precision,
        info.world_size,
        len(train_split),
        len(val_split),
        dataset.num_features,
        dataset.num_classes,
        cfg.epochs,
        batches_per_epoch,
    )

    writer = None
    if cfg.checkpoint_dir and info.is_main:
        writer = checkpoint.CheckpointWriter(
            cfg.checkpoint_dir,
            keep=cfg.keep_checkpoints,
            on_saved=lambda path, state: log.info(
                "checkpoint saved: %s (epoch %d, step %d)", path, state["epoch"], state["global_step"]
            ),
        )
    cpu_group = None
    if info.distributed:
        # Created on every rank at the same point (group creation is collective).
        cpu_group = (
            torch.distributed.group.WORLD
            if torch.distributed.get_backend() == "gloo"
            else torch.distributed.new_group(backend="gloo")
        )
    job = _Job(
        cfg=cfg,
        info=info,
        device=device,
        precision=precision,
        amp_dtype=amp_dtype,
        dataset=dataset,
        record=record,
        core=core,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        train_split=train_split,
        val_split=val_split,
        batches_per_epoch=batches_per_epoch,
        tracker=tracker,
        writer=writer,
        vote=preemption.StopVote(notice, group=cpu_group),
        cpu_group=cpu_group,
    )
    return job, progress


def _restore(
    cfg: TrainConfig,
    record: dict[str, Any],
    core: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    info: runtime.DistInfo,
) -> _Progress:
    """Load the latest checkpoint of ``cfg.checkpoint_dir`` into the model, optimizer and scaler.

    A mid-epoch checkpoint written under DDP holds each rank's running loss and RNG state: each rank
    continues its own (with another world size, rank 0's, as before).

    :returns: the progress it recorded; a fresh start when there is none.
    :raises TrainerError: when the checkpoint was written by another configuration or model.
    """
    found = checkpoint.load_latest(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if info.distributed:
        _check_same_checkpoint(found[0] if found else None, cfg.checkpoint_dir, info)
    if found is None:
        return _Progress()
    path, state = found
    checkpoint.check_compatible(state["config"], record, path=path)
    try:
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise TrainerError(f"checkpoint {path} does not fit this model: {err}") from err
    ranks = state.get("ranks")
    if ranks and len(ranks) == info.world_size:
        state = {**state, "partial": ranks[info.rank]["partial"], "rng": ranks[info.rank]["rng"]}
    progress = _Progress(
        epoch=int(state["epoch"]),
        skip_batches=int(state["step_in_epoch"]),
        global_step=int(state["global_step"]),
        history=list(state["history"]),
        partial=dict(state["partial"]),
        run_id=state["run_id"],
        # Metric rows the previous try could not deliver (tracking was down): sent first this time.
        pending_metrics=list(state.get("pending_metrics", [])),
        resumed_state=state,
    )
    progress.resumed_from = progress.epoch
    log.info(
        "resuming from %s: epoch %d done, step %d of the next (global step %d)",
        path,
        progress.epoch,
        progress.skip_batches,
        progress.global_step,
    )
    return progress


def _check_same_checkpoint(path: str | None, directory: str | None, info: runtime.DistInfo) -> None:
    """Every rank resumes from the same checkpoint, or the job stops here.

    A rank that sees another checkpoint, or none (a checkpoint directory local to each node), would train
    other epochs than its peers and hang the job in their next collective.

    :raises TrainerError: on every rank, naming what each one sees.
    """
    views: list[str | None] = [None] * info.world_size
    torch.distributed.all_gather_object(views, os.path.basename(path) if path else None)
    if len(set(views)) > 1:
        seen = ", ".join(f"rank {rank}: {view or 'none'}" for rank, view in enumerate(views))
        raise TrainerError(
            f"the ranks see different checkpoints in {directory} ({seen}): every node must see the same "
            "checkpoint directory (checkpoint_uri, or a ReadWriteMany volume)"
        )


def _start_tracking(
    cfg: TrainConfig,
    env: Mapping[str, str],
    info: runtime.DistInfo,
    device: torch.device,
    precision: str,
    lineage: dict[str, Any],
    progress: _Progress,
) -> Tracker:
    """Open (or, resuming, reopen) the MLflow run on rank 0 and log the parameters."""
    from gpu_trainer.tracking import Tracker, tracking_retry_seconds

    tracker = Tracker(
        experiment=cfg.experiment,
        run_name=cfg.run_name,
        resume_run_id=progress.run_id,
        lineage=lineage,
        pending_metrics=progress.pending_metrics,
        retry_seconds=tracking_retry_seconds(env),
    )
    progress.run_id = tracker.run_id
    resumed = (
        {} if progress.resumed_from is None else {"mltrain.resumed_from_epoch": str(progress.resumed_from)}
    )
    tracker.log_params(
        {**cfg.params(), "precision": precision, "device": device.type, "world_size": info.world_size},
        tags=resumed,
    )
    return tracker


def _rank_states(job: _Job, loss_sum: float, count: int) -> list[dict[str, Any]] | None:
    """Every rank's running loss and RNG state, for rank 0's mid-epoch checkpoint (a collective: every
    rank calls it at the same step); None in a single process, whose state is the checkpoint's own."""
    if job.cpu_group is None:
        return None
    mine = {"partial": {"loss_sum": loss_sum, "count": count}, "rng": runtime.rng_state()}
    gathered: list[Any] = [None] * job.info.world_size
    torch.distributed.all_gather_object(gathered, mine, group=job.cpu_group)
    return gathered


def _save_checkpoint(
    job: _Job,
    progress: _Progress,
    epoch: int,
    step_in_epoch: int,
    loss_sum: float,
    count: int,
    ranks: list[dict[str, Any]] | None = None,
) -> None:
    """Hand the full training state to the background writer (rank 0 with a checkpoint directory).

    :param ranks: each rank's running loss and RNG state at a mid-epoch position (:func:`_rank_states`).
    """
    if job.writer is None:
        return
    state = {
        "model": job.core.state_dict(),
        "optimizer": job.optimizer.state_dict(),
        "scaler": job.scaler.state_dict(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "global_step": progress.global_step,
        "rng": runtime.rng_state(),
        "history": progress.history,
        "partial": {"loss_sum": loss_sum, "count": count},
        "config": job.record,
        "run_id": progress.run_id,
        "pending_metrics": job.tracker.pending_metrics() if job.tracker is not None else [],
    }
    if ranks is not None:
        state["ranks"] = ranks
    job.writer.submit(state, global_step=progress.global_step)


def _stop_preempted(job: _Job, progress: _Progress, position: tuple[int, int, float, int] | None) -> NoReturn:
    """After a SIGTERM, on every rank: checkpoint where training stands, synchronously, then stop.

    :param position: (epoch, step within it, running loss sum, sample count) after the step every rank
        stopped after; None when the epoch-end checkpoint already submitted is that position.
    :raises preemption.TrainingPreempted: always, once the checkpoint is on disk.
    """
    start = time.perf_counter()
    if position is not None:
        epoch, step_in_epoch, loss_sum, count = position
        ranks = _rank_states(job, loss_sum, count)
        _save_checkpoint(job, progress, epoch, step_in_epoch, loss_sum, count, ranks)
    if job.writer is not None:
        job.writer.wait()  # the background write in flight, or the one just submitted
    written_in = time.perf_counter() - start
    job.vote.barrier()
    notice = job.vote.notice
    since_signal = (
        f"{time.monotonic() - notice.received_at:.2f} s after the signal"
        if notice is not None and notice.received_at is not None
        else "signal received by another rank"
    )
    where = (
        "" if position is None else f" (epoch {position[0] + 1}, step {position[1]}/{job.batches_per_epoch})"
    )
    if job.writer is not None:
        log.warning(
            "SIGTERM: checkpoint at step %d%s written in %.2f s (%s); exiting %d: preempted, "
            "a restart resumes from this checkpoint (size the pod's terminationGracePeriodSeconds from these times)",
            progress.global_step,
            where,
            written_in,
            since_signal,
            contract.PREEMPTED_EXIT_CODE,
        )
    elif job.info.is_main:
        log.warning(
            "SIGTERM: stopped after step %d%s (%s) with no checkpoint directory, so a restart starts over; "
            "exiting %d",
            progress.global_step,
            where,
            since_signal,
            contract.PREEMPTED_EXIT_CODE,
        )
    else:
        log.warning(
            "SIGTERM: stopped after step %d with every rank; rank 0 wrote the checkpoint",
            progress.global_step,
        )
    raise preemption.TrainingPreempted(progress.global_step)


def _run_epoch(job: _Job, progress: _Progress, epoch: int) -> None:
    """Train one epoch on every rank; then rank 0 validates, logs the metrics and checkpoints."""
    epoch_start = time.perf_counter()
    train_loss, trained_now = _train_epoch(job, progress, epoch, epoch_start)
    train_seconds = time.perf_counter() - epoch_start
    samples_per_s = trained_now * job.info.world_size / max(train_seconds, 1e-9)
    progress.samples_trained += trained_now * job.info.world_size
    if job.info.is_main:
        _end_epoch(job, progress, epoch, train_loss, samples_per_s, epoch_start)


def _train_epoch(job: _Job, progress: _Progress, epoch: int, epoch_start: float) -> tuple[float, int]:
    """The training steps of one epoch (continuing an interrupted one after a mid-epoch checkpoint).

    :returns: the mean training loss over all ranks, and the samples this rank trained now.
    :raises TrainerError: when the loss is not finite (divergence).
    """
    cfg, info, device, amp_dtype = job.cfg, job.info, job.device, job.amp_dtype
    model, optimizer, scaler, train_split = job.model, job.optimizer, job.scaler, job.train_split
    batches_per_epoch = job.batches_per_epoch
    skip_batches = progress.skip_batches
    if skip_batches and progress.resumed_state is not None:
        runtime.set_rng_state(progress.resumed_state["rng"])
    else:
        runtime.seed_everything(runtime.epoch_seed(cfg.seed, epoch, info.rank))
    indices = epoch_indices(
        len(train_split),
        epoch=epoch,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        shuffle=True,
    ).to(train_split.labels.device)
    model.train()
    # Accumulate on the device: a .item() per step would synchronise CUDA every step.
    loss_sum = torch.tensor(
        progress.partial["loss_sum"] if skip_batches else 0.0, device=device, dtype=torch.float64
    )
    count = int(progress.partial["count"]) if skip_batches else 0
    step_in_epoch = skip_batches
    trained_now = 0
    for x, y in iterate_batches(
        train_split,
        indices,
        cfg.batch_size,
        skip_batches=skip_batches,
        # Device-resident data is sliced on the GPU; worker processes cannot hold CUDA tensors.
        num_workers=cfg.num_workers if train_split.features.device.type == "cpu" else 0,
        pin_memory=device.type == "cuda",
    ):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:  # the scaler is off: its three no-op calls per step still cost launch-bound models time
            loss.backward()
            optimizer.step()
        batch = int(y.shape[0])
        loss_sum.add_(loss.detach(), alpha=batch)  # one kernel, no host sync
        count += batch
        trained_now += batch
        step_in_epoch += 1
        progress.global_step += 1
        if cfg.log_every_steps and progress.global_step % cfg.log_every_steps == 0:
            elapsed = time.perf_counter() - epoch_start
            steps_left = (batches_per_epoch - step_in_epoch) + (cfg.epochs - epoch - 1) * batches_per_epoch
            log.info(
                "epoch %d/%d step %d/%d loss %.4f samples/s %.0f eta %s",
                epoch + 1,
                cfg.epochs,
                step_in_epoch,
                batches_per_epoch,
                loss.item(),
                trained_now * info.world_size / max(elapsed, 1e-9),
                _fmt_eta(elapsed / max(step_in_epoch - skip_batches, 1) * steps_left),
            )
        # Epoch ends checkpoint in _end_epoch, after validation; here only mid-epoch positions.
        at_interval = cfg.checkpoint_every_steps and progress.global_step % cfg.checkpoint_every_steps == 0
        if at_interval and step_in_epoch < batches_per_epoch:
            ranks = _rank_states(job, float(loss_sum.item()), count)
            _save_checkpoint(job, progress, epoch, step_in_epoch, float(loss_sum.item()), count, ranks)
        if job.vote.after_step():
            _stop_preempted(job, progress, (epoch, step_in_epoch, float(loss_sum.item()), count))
    progress.skip_batches = 0
    totals = torch.tensor([loss_sum.item(), float(count)], dtype=torch.float64)
    if info.distributed:
        torch.distributed.all_reduce(totals)
    train_loss = float(totals[0].item() / max(totals[1].item(), 1.0))
    if not math.isfinite(train_loss):
        raise TrainerError(
            f"training diverged: train_loss is {train_loss} in epoch {epoch + 1}; lower --lr or use fp32"
        )
    return train_loss, trained_now


def _end_epoch(
    job: _Job, progress: _Progress, epoch: int, train_loss: float, samples_per_s: float, epoch_start: float
) -> None:
    """Rank 0 after an epoch: validate, log the metrics, checkpoint the epoch's end, print the summary."""
    cfg = job.cfg
    job.core.eval()
    last_eval = score_split(
        job.core,
        job.val_split,
        num_classes=job.dataset.num_classes,
        device=job.device,
        batch_size=max(cfg.batch_size, 1024),
        autocast_dtype=job.amp_dtype,
    )
    progress.last_eval = last_eval
    row = {
        "epoch": float(epoch + 1),
        "train_loss": train_loss,
        **last_eval.as_metrics(),
        "samples_per_s": samples_per_s,
    }
    progress.history.append(row)
    assert job.tracker is not None
    job.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
    _save_checkpoint(job, progress, epoch + 1, 0, 0.0, 0)
    progress.epoch_times.append(time.perf_counter() - epoch_start)
    remaining = (cfg.epochs - epoch - 1) * (sum(progress.epoch_times) / len(progress.epoch_times))
    log.info(
        "epoch %d/%d train_loss %.4f val_loss %.4f val_accuracy %.4f val_f1 %.4f samples/s %.0f eta %s",
        epoch + 1,
        cfg.epochs,
        train_loss,
        last_eval.loss,
        last_eval.accuracy,
        last_eval.f1,
        samples_per_s,
        _fmt_eta(remaining),
    )


def _finalize(job: _Job, progress: _Progress, loop_seconds: float) -> TrainOutcome:
    """After the last epoch: rank 0 delivers the metrics, logs the model and writes the result JSON;
    the other ranks wait for it."""
    cfg, info = job.cfg, job.info
    if not info.is_main:
        if info.distributed:
            # Wait for rank 0 to finish logging before the group goes away.
            torch.distributed.barrier()
        return TrainOutcome(result=None, loop_seconds=loop_seconds, samples_trained=progress.samples_trained)

    tracker = job.tracker
    assert tracker is not None
    job.core.eval()
    last_eval = progress.last_eval
    if last_eval is None:
        # Resumed after the last epoch had finished (e.g. killed while logging the model).
        last_eval = score_split(
            job.core,
            job.val_split,
            num_classes=job.dataset.num_classes,
            device=job.device,
            autocast_dtype=job.amp_dtype,
        )
    if not progress.history:
        raise TrainerError("no epoch was trained (check --epochs)")
    final = dict(progress.history[-1])
    final.pop("epoch")
    # Buffered metrics first: if tracking is still down, fail now with the work kept in the checkpoint.
    tracker.require_delivered(kept_in=cfg.checkpoint_dir, final_metrics=final)
    tracker.log_figures(progress.history, last_eval.confusion)
    example = job.dataset.val.features[: min(5, len(job.dataset.val))]
    model_uri = tracker.log_model(job.core, example)
    if job.writer is not None:
        job.writer.wait()  # the last epoch's checkpoint, written while the model uploaded
    result = contract.make_result(
        run_id=progress.run_id,
        model_uri=model_uri,
        metrics=final,
        params={**cfg.params(), "precision": job.precision, "world_size": info.world_size},
        resumed_from_epoch=progress.resumed_from,
        experiment_id=tracker.experiment_id,
    )
    contract.write_result(cfg.output, result)
    tracker.end()
    log.info("done: run %s, model %s, result %s", progress.run_id, model_uri, cfg.output)
    if info.distributed:
        torch.distributed.barrier()
    return TrainOutcome(result=result, loop_seconds=loop_seconds, samples_trained=progress.samples_trained)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with one error line for bad input).

    :param argv: arguments without the program name; ``sys.argv[1:]`` when None.
    """
    from gpu_trainer.tracking import bound_tracking_requests

    # This process is the trainer alone, so MLflow's HTTP limits can be set in its environment.
    bound_tracking_requests(os.environ)
    # Before anything slow: a SIGTERM during start-up is a preemption too (stops after the first step).
    notice = preemption.StopNotice().install()
    try:
        return run_cli(
            lambda: train(resolve_config(sys.argv[1:] if argv is None else argv, os.environ), notice=notice)
        )
    except preemption.TrainingPreempted:
        return contract.PREEMPTED_EXIT_CODE
    finally:
        notice.uninstall()


if __name__ == "__main__":
    runtime.exit_now(main())
