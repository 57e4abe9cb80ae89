"""A model cut into pipeline stages, one Ray actor per stage, micro-batches streamed through them.

GPipe's forward schedule on Ray's own machinery: every micro-batch's call on stage k is
submitted at once, with the ObjectRefs of the earlier stages' results as arguments, so Ray
starts it as soon as they are ready; an actor runs its calls one at a time in submission
order, so while stage k+1 works on micro-batch i, stage k works on i+1. Tensors go from
stage to stage through Ray's object store, never through the driver.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from hyperion.errors import FeedError, OptionError, RuntimeExecutionError, StageFailedError
from hyperion.frontend import ModelLike
from hyperion.planner.partition import Balance, Partition, partition
from hyperion.ray.worker import StageWorker
from hyperion.units import parse_size

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


class RayPipeline:
    """``model`` cut into ``stages`` (:func:`hyperion.partition`), each an actor holding its
    weights under ``memory_limit_per_stage``; :meth:`run` returns what
    :meth:`hyperion.CompiledModel.run` returns.

    ``micro_batches``: the batch (axis 0 of every input) is split into this many parts that
    flow through the stages one after another, overlapping (models that declare their batch
    dim symbolic; see :meth:`run_batches` for others). Without ``input_shapes`` the model is
    partitioned on the first run, for the shapes of its micro-batches.
    ``num_cpus`` per actor (default: the cluster's CPUs shared by the stages, at most 1);
    ``max_restarts``: a stage whose actor dies is restarted (its model compiled again) and
    its calls retried that many times, else the run raises
    :class:`~hyperion.errors.StageFailedError`; so does a run not done in ``timeout_s``.
    ``partition``: a :class:`~hyperion.Partition` (or its file) to run as it is.
    """

    def __init__(self, model: ModelLike | None = None, stages: int = 2,
                 memory_limit_per_stage: int | str | None = None, micro_batches: int = 1, *,
                 partition: Partition | str | os.PathLike | None = None, balance: Balance = "time",
                 input_shapes: Mapping[str, Sequence[int]] | None = None, num_cpus: float | None = None,
                 max_restarts: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise OptionError(f"micro_batches: expected a positive integer, got {micro_batches!r}")
        if model is None and partition is None:
            raise OptionError("model: give the model to partition, or partition= a saved partition")
        self.model = model
        self.stages = stages
        self.memory_limit_per_stage = parse_size(memory_limit_per_stage, option="memory_limit_per_stage")
        self.micro_batches = micro_batches
        self.balance = balance
        self.num_cpus = num_cpus
        self.max_restarts = max_restarts
        self.timeout_s = timeout_s
        self.plan: Partition | None = None
        self._actors: list[Any] = []
        if partition is not None:
            self._start(partition if isinstance(partition, Partition) else Partition.load(partition))
        elif input_shapes is not None:
            self._start(self._partition(input_shapes))

    # -- the actors -----------------------------------------------------------------------
    def _partition(self, input_shapes: Mapping[str, Sequence[int]]) -> Partition:
        assert self.model is not None
        return partition(self.model, self.stages, self.memory_limit_per_stage, balance=self.balance,
                         input_shapes=input_shapes)

    def _start(self, plan: Partition) -> None:
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
        cpus = self.num_cpus or min(1.0, ray.cluster_resources().get("CPU", 1.0) / len(plan.stages))
        worker = ray.remote(StageWorker)
        self.plan = plan
        self._actors = [
            worker.options(num_cpus=cpus, memory=_admitted_bytes(plan, stage.index), max_restarts=self.max_restarts,
                           max_task_retries=self.max_restarts).remote(
                stage.index, stage.model, stage.schedule.to_json(), plan.base_dir, max(1, round(cpus)))
            for stage in plan.stages]
        log.info("started %d stage actors (%s CPUs each)", len(self._actors), cpus)

    @property
    def actors(self) -> list[Any]:
        """The stage actors, in stage order (empty until the first run when partitioned lazily)."""
        return list(self._actors)

    def shutdown(self) -> None:
        """End the stage actors (the cluster stays up)."""
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []

    def __enter__(self) -> RayPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def stage_peak_rss_bytes(self) -> list[int]:
        """Each stage actor's peak RSS above its post-import baseline."""
        return self._get([a.peak_rss_bytes.remote() for a in self._actors], list(range(len(self._actors))))

    def stage_modes(self) -> list[str]:
        """The mode each stage runs in: ``normal`` when its weights stay resident under its cap."""
        return self._get([a.mode.remote() for a in self._actors], list(range(len(self._actors))))

    # -- running --------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the model for ``feeds``, the batch streamed as ``micro_batches`` parts."""
        if not isinstance(feeds, Mapping):
            raise FeedError(f"feeds: expected a dict of input name -> array, got {type(feeds).__name__}")
        parts = self._split(feeds)
        results = self.run_batches(parts)
        if len(results) == 1:
            return results[0]
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}

    def _split(self, feeds: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        if self.micro_batches == 1:
            return [dict(feeds)]
        arrays = {name: np.asarray(value) for name, value in feeds.items()}
        batch = {a.shape[0] for a in arrays.values() if a.ndim > 0}
        if len(batch) != 1 or next(iter(batch)) < self.micro_batches:
            raise FeedError(f"micro_batches={self.micro_batches}: every input needs the same batch (axis 0) of at "
                            f"least {self.micro_batches} samples; got shapes "
                            f"{ {k: v.shape for k, v in arrays.items()} }")
        if self.plan is not None and not self.plan.free_batch:
            raise FeedError("micro_batches: the model declares a fixed batch dim, so its batch cannot be split; "
                            "use micro_batches=1, or run_batches() with feeds of that batch")
        pieces = {k: np.array_split(v, self.micro_batches) if v.ndim > 0 else [v] * self.micro_batches
                  for k, v in arrays.items()}
        return [{k: pieces[k][i] for k in arrays} for i in range(self.micro_batches)]

    def run_batches(self, batches: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """The outputs for each feed dict in ``batches``, streamed through the stages overlapping."""
        if not batches:
            return []
        if self.plan is None:
            self._start(self._partition({k: list(np.shape(v)) for k, v in batches[0].items()}))
        return self.collect(self.submit(batches))

    def submit(self, batches: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, Any]]:
        """Submit every micro-batch to every stage now; per micro-batch, the ObjectRef of each
        stage that returns graph outputs (:meth:`collect` waits for them)."""
        assert self.plan is not None, "run_batches partitions the model first"
        plan = self.plan
        sources = {s.index: sorted({e.src for e in plan.edges if e.dst == s.index and e.src is not None})
                   for s in plan.stages}
        from_caller = {s.index: [e.tensor for e in plan.edges if e.dst == s.index and e.src is None]
                       for s in plan.stages}
        returning = sorted({e.src for e in plan.edges if e.dst is None and e.src is not None})
        pending = []
        for feeds in batches:
            missing = [n for n in plan.graph_inputs if n not in feeds]
            if missing:
                raise FeedError(f"feeds: missing input {missing[0]!r}; inputs are {list(plan.graph_inputs)}")
            refs: dict[int, Any] = {}
            for stage in plan.stages:
                direct = {name: feeds[name] for name in from_caller[stage.index]}
                refs[stage.index] = self._actors[stage.index].run.remote(
                    direct, *(refs[src] for src in sources[stage.index]))
            pending.append({str(k): refs[k] for k in returning} | {"feeds": {
                n: feeds[n] for n in plan.graph_outputs if n in feeds}})
        return pending

    def collect(self, pending: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        """The outputs of submitted micro-batches, in the model's output order."""
        assert self.plan is not None
        results = []
        for entry in pending:
            stage_ids = [int(k) for k in entry if k != "feeds"]
            parts = self._get([entry[str(k)] for k in stage_ids], stage_ids)
            merged = dict(entry["feeds"])
            for part in parts:
                merged.update(part)
            results.append({name: merged[name] for name in self.plan.graph_outputs})
        return results

    def _get(self, refs: list[Any], stage_ids: list[int]) -> list[Any]:
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError:
            raise StageFailedError(f"pipeline: no result from stages {stage_ids} within timeout_s={self.timeout_s} "
                                   "s; a stage actor may be stuck or starved of CPUs") from None
        except RayActorError as exc:
            stage = _dead_stage(self._actors, exc)
            raise StageFailedError(f"pipeline: stage {stage} died during the run ({type(exc).__name__}); "
                                   "rerun, or give max_restarts= to restart and retry it", stage=stage) from None
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else None
            if cause is not None and isinstance(cause, RuntimeExecutionError | FeedError):
                raise cause from None
            raise StageFailedError(f"pipeline: a stage failed: {str(exc).splitlines()[0]}") from None


def _dead_stage(actors: Sequence[Any], exc: RayActorError) -> int | None:
    actor_id = getattr(exc, "actor_id", None)
    for index, actor in enumerate(actors):
        if actor_id is not None and actor._actor_id.hex() == actor_id:
            return index
    return None


def _admitted_bytes(plan: Partition, index: int) -> int:
    """What Ray's logical ``memory`` resource admits the stage's actor with: its cap, or
    without one its plan's peak (Ray only admits; the stage holds itself to the cap)."""
    stage = plan.stages[index]
    return max(1, plan.memory_limit_per_stage or stage.schedule.peak_bytes)
