"""The frontend: an ONNX model (path, bytes or ModelProto) into Hyperion's IR.

``source`` reads the model as given and locates external data without reading
it; ``fold`` turns large tensors computed from constants alone into weights;
``shapes`` infers every tensor's type on a weightless skeleton; ``build``
constructs the IR; ``prune`` restricts it to what some outputs need; ``embedded``
serves large embedded weights as external data.
"""

from __future__ import annotations

from hyperion.frontend.build import (
           ImportedModel,
           import_model,
           require_bound,
           unbound_dims,
)
from hyperion.frontend.fold import fold_constants
from hyperion.frontend.prune import ancestor_nodes, is_whole_graph, restrict_graph, restrict_to_outputs
from hyperion.frontend.shapes import declared_input_shapes
from hyperion.frontend.source import ModelLike, ModelSource, load_source

__all__ = ["ImportedModel", "ModelLike", "ModelSource", "ancestor_nodes", "declared_input_shapes", "fold_constants",
           "import_model", "is_whole_graph", "load_source", "require_bound", "restrict_graph", "restrict_to_outputs",
           "unbound_dims"]
