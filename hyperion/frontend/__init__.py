"""The frontend: an ONNX model (path, bytes or ModelProto) into Hyperion's IR.

``source`` reads the model as given and locates external data without reading
it; ``shapes`` infers every tensor's type on a weightless skeleton; ``build``
constructs the IR; ``embedded`` serves large embedded weights as external data.
"""

from __future__ import annotations

from hyperion.frontend.build import (
           ImportedModel,
           import_model,
           require_bound,
           unbound_dims,
)
from hyperion.frontend.shapes import declared_input_shapes
from hyperion.frontend.source import ModelLike, ModelSource, load_source

__all__ = ["ImportedModel", "ModelLike", "ModelSource", "declared_input_shapes", "import_model", "load_source",
           "require_bound", "unbound_dims"]
