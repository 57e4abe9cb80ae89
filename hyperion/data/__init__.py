"""Package data: the model ``hyperion demo`` runs (``demo.onnx``, written by ``python -m fixtures.generate demo``)."""
