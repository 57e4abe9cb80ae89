"""Hyperion on Ray (the optional extra ``hyperion[ray]``): pipeline stages as actors, each under its
own cap (:class:`RayPipeline`), and a compiled model over a Ray Dataset (:func:`map_batches`).

Ray's ``memory=`` resource is logical: it only decides where an actor may start. Each actor
holds itself to its cap with Hyperion's own plan (the stage's schedule, compiled under
``memory_limit_per_stage``) -- see docs/cluster.md.
"""

from __future__ import annotations

from hyperion.errors import MissingExtraError

try:
    import ray  # noqa: F401  (the extra this package needs)
except ImportError as exc:
    raise MissingExtraError("hyperion.ray needs Ray, which is not installed: pip install 'hyperion[ray]'") from exc

from hyperion.ray.data import map_batches
from hyperion.ray.pipeline import RayPipeline
from hyperion.ray.worker import StageWorker

__all__ = ["RayPipeline", "StageWorker", "map_batches"]
