"""onnxruntime's symbolic shape inference, in this process or in a child one.

It sizes what onnx's inference leaves unsized (contrib ops, value-dependent shapes),
but it runs on sympy, and importing sympy adds about 33 MiB to the process for good.
Under a memory cap that is RSS no plan accounts, and more than the 32 MiB allowance
of the promise, so a capped compile runs it in a child process: this file, run as a
script (it imports nothing of Hyperion's, so the child skips the package's imports),
reads the model from standard input and writes the inferred one to standard output.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import tempfile

from onnx import ModelProto

log = logging.getLogger(__name__)


def infer_symbolic(model: ModelProto, label: str, *, isolated: bool = False) -> ModelProto | None:
    """``model`` with the shapes onnxruntime's symbolic inference gives, or None when it fails.

    ``isolated`` runs it in a child process unless sympy is loaded here already.
    """
    if isolated and "sympy" not in sys.modules:
        return _in_child(model, label)
    try:
        return _infer(model)
    except Exception as exc:  # a best effort on top of onnx's inference
        log.info("%s: onnxruntime symbolic shape inference failed: %s", label, exc)
        return None


def _infer(model: ModelProto) -> ModelProto:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # On incomplete inference it saves a debug model into the working directory;
    # run it in a scratch folder so nothing is left behind in the user's.
    with tempfile.TemporaryDirectory(prefix="hyperion-shapes-") as scratch, contextlib.chdir(scratch):
        # No auto_merge / rank guessing: both make up dims (a broadcast [1, 1] merged into [3, 4]).
        return SymbolicShapeInference.infer_shapes(model, auto_merge=False, guess_output_rank=False)


def _in_child(model: ModelProto, label: str) -> ModelProto | None:
    done = subprocess.run([sys.executable, __file__], input=model.SerializeToString(), capture_output=True,
                          check=False)
    if done.returncode != 0:
        reason = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        log.info("%s: onnxruntime symbolic shape inference failed: %s", label, reason)
        return None
    inferred = ModelProto()
    inferred.ParseFromString(done.stdout)
    return inferred


def _main() -> None:
    model = ModelProto()
    model.ParseFromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(_infer(model).SerializeToString())


if __name__ == "__main__":
    _main()
