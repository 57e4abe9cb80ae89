"""``hyperion demo``: the bundled model compiled, inspected, run and checked, with and without a cap."""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

import numpy as np

from hyperion.errors import ModelLoadError

#: The model ``hyperion demo`` runs, shipped as package data.
BUNDLED_DEMO = files("hyperion.data") / "demo.onnx"
DEMO_SEED = 0


def run_demo(model: Path | None, output_dir: Path) -> int:
    """Run the demo on ``model``, or on the bundled model if None; 0 if every output matched."""
    if model is not None:
        if not model.is_file():
            raise ModelLoadError(f"{model}: no such model file; pass an .onnx file to --model, "
                                 "or leave --model out to run the bundled demo model")
        return _run(model, output_dir)
    if not BUNDLED_DEMO.is_file():
        raise ModelLoadError(f"{BUNDLED_DEMO}: the bundled demo model is missing from this installation; "
                             "reinstall hyperion, or pass a model with --model")
    with as_file(BUNDLED_DEMO) as bundled:
        return _run(bundled, output_dir)


def _run(model: Path, output_dir: Path) -> int:
    import hyperion
    from hyperion.tools.bench import ort_session
    from hyperion.tools.feeds import input_shapes_of, random_feeds
    from hyperion.tools.report import summary
    from hyperion.units import format_size

    output_dir.mkdir(parents=True, exist_ok=True)

    uncapped = hyperion.compile(model)
    shapes = input_shapes_of(uncapped.base_ir)
    feeds = random_feeds(uncapped.base_ir, shapes, DEMO_SEED)
    session = ort_session(model)
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))

    print(f"== {model.name}: {len(uncapped.base_ir.nodes)} nodes, "
          f"{format_size(uncapped.base_ir.weight_bytes())} of weights, inputs {shapes}\n")
    status = 0
    cap: int | None = None
    # Three quarters: below what normal mode needs, above what memory_opt needs (it also
    # accounts onnxruntime's copy of each weight while it is being packed).
    for label in ("no memory limit", "memory limit = 3/4 of the uncapped peak"):
        cm = hyperion.compile(model, memory_limit=cap, input_shapes=shapes)
        outputs = cm.run(feeds)
        same = all(np.allclose(outputs[k], v, rtol=1e-5, atol=1e-6) for k, v in expected.items())
        status |= 0 if same else 1
        name = "uncapped" if cap is None else "capped"
        schedule_path = cm.schedule.save(output_dir / f"demo.{name}.schedule.json")
        print(f"-- {label}")
        print(summary(cm.schedule))
        print(f"run          {cm.stats.total_ms:.1f} ms, accounted peak {format_size(cm.stats.peak_bytes)}; "
              f"outputs {'match' if same else 'DO NOT match'} plain onnxruntime")
        print(f"schedule     {schedule_path}")
        _plot(cm.schedule, output_dir / f"demo.{name}.memory.png")
        print()
        cap = cm.schedule.peak_bytes * 3 // 4
    print("next: hyperion inspect " + str(output_dir / "demo.capped.schedule.json"))
    return status


def _plot(schedule, path: Path) -> None:
    from hyperion.errors import OptionError
    from hyperion.tools.plot import plot_memory

    try:
        print(f"plot         {plot_memory(schedule, path)}")
    except OptionError as exc:
        print(f"plot         skipped ({exc})")
