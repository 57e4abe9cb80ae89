"""Coverage-guided fuzzing of model bytes with atheris (``make fuzz``; not collected by pytest).

    python -m tests.fuzz_atheris -max_total_time=600

Each input is a model file, written into a fresh folder beside ``outside/secret.bin``,
compiled in a mode picked by its last byte and run when small. Only a HyperionError may
come out, and no output may hold the secret. The corpus starts from copies of the small
fixtures, in a temporary folder (libFuzzer writes new inputs into it). The protobuf-aware
mutator (atheris-libprotobuf-mutator) needs bazel to build and is not used.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import hyperion
    from hyperion.errors import HyperionError

from tests.test_fuzz import SECRET, SMALL_FIXTURES, compile_and_run  # noqa: E402

MODES = ("normal", "memory_opt", "streaming", "adaptive")
ROOT = Path(tempfile.mkdtemp(prefix="hyperion-atheris-"))


def one_input(data: bytes) -> None:
    if not data:
        return
    folder = Path(tempfile.mkdtemp(dir=ROOT))
    (folder / "outside").mkdir()
    (folder / "outside" / "secret.bin").write_bytes(SECRET)
    (folder / "model").mkdir()
    shutil.copy(Path("fixtures/external_data.onnx.data"), folder / "model")
    (folder / "model" / "m.onnx").write_bytes(data[:-1])
    try:
        compile_and_run(folder / "model" / "m.onnx", MODES[data[-1] % 4], "300KB" if data[-1] & 4 else None)
    except HyperionError:
        pass
    finally:
        assert (folder / "outside" / "secret.bin").read_bytes() == SECRET
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    corpus = ROOT / "corpus"
    corpus.mkdir()
    for name in SMALL_FIXTURES:
        (corpus / name).write_bytes(Path(f"fixtures/{name}.onnx").read_bytes() + b"\0")
    print(f"hyperion {hyperion.__version__}: fuzzing model bytes; corpus in {corpus}", file=sys.stderr)
    atheris.Setup([sys.argv[0], *sys.argv[1:], str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
