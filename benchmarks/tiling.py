"""Steps bigger than the cap: the smallest feasible cap with and without the tile pass, and
the cost of split steps against plain onnxruntime.

For each model:

* **Smallest feasible cap.** What ``compile`` names when refusing a cap of one byte in
  ``adaptive`` mode (``MemoryLimitError.smallest_limit_bytes``, also ``hyperion compile
  --smallest-limit``) -- *before*: with the tile pass finding nothing to split (its
  finders patched out in this process), *weight tiles*: with row gathers and weight tiles
  but no regions (steps tiled along a free axis of their activations), *free axes*: with
  regions but no spatial patches (Convs and pools along rows, with halos), *after*: as
  shipped. Each as a fraction of the uncapped plan's accounted peak (normal mode, every
  weight resident).
* **Latency at a cap that needs the split.** At the midpoint between the smallest cap after and
  the one without patches when patches lower it, else the one before (no plan fits it
  without the split; or the smallest cap above it that a plan meets,
  when the bookkeeping of the sessions kept across runs needs more), after one warm-up run, ``--repeats`` runs:
  the time of every split step (its segment's time: reading the rows or weight tiles,
  building the tile sessions, computing) against the same op alone in plain onnxruntime
  (a one-node session with the whole weight as an initializer, packed, warmed up, on
  inputs of the same shapes); every region (its segment's time: its session run tile by
  tile) against its steps whole in one plain onnxruntime session (the segment's model,
  untiled, on inputs of the same shapes); and the whole run against plain onnxruntime's
  session of the model. Medians with min-max; ratios of medians. One process, runs alternating.
  The run's outputs are checked against onnxruntime's: the largest difference relative to
  the output's largest magnitude.

Prints Markdown tables and writes every figure to ``--json``
(default benchmarks/results/tiling.json).

    python benchmarks/tiling.py --corpus /path/to/corpus_models \
        [--only bert_base,gpt2_small] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hyperion  # noqa: E402
import hyperion.passes.tile as tile_pass  # noqa: E402
from corpus import feeds as corpus_feeds  # noqa: E402
from corpus import load_manifest  # noqa: E402
from hyperion.frontend import load_source  # noqa: E402
from hyperion.runtime.segment_model import build_segment_model, nodes_by_name  # noqa: E402
from hyperion.runtime.sessions import session_options  # noqa: E402
from hyperion.tools.report import markdown_table  # noqa: E402

MIB = 2**20
DEFAULT_MODELS = ("bert_base", "gpt2_small", "whisper_tiny", "unet", "light_vgg19", "light_bvlc_alexnet",
                  "light_zfnet512", "light_densenet121", "light_inception_v1", "light_inception_v2", "light_resnet50",
                  "light_shufflenet", "light_squeezenet")


@contextmanager
def regions_off() -> Iterator[None]:
    """The tile pass makes no region: weight tiles and row gathers only."""
    find_regions = tile_pass.find_regions
    tile_pass.find_regions = lambda graph, liveness, *args: ((), liveness.order)
    try:
        yield
    finally:
        tile_pass.find_regions = find_regions


@contextmanager
def patches_off() -> Iterator[None]:
    """The tile pass makes regions along free axes only: no spatial patches."""
    find_regions = tile_pass.find_regions
    tile_pass.find_regions = lambda *args: find_regions(*args[:7], spatial=False)
    try:
        yield
    finally:
        tile_pass.find_regions = find_regions


@contextmanager
def tile_pass_off() -> Iterator[None]:
    """The tile pass finds no step to split: the plans Hyperion made before it."""
    row_gathers, tiled_steps = tile_pass.row_gathers, tile_pass.tiled_steps
    tile_pass.row_gathers = lambda graph: {}
    tile_pass.tiled_steps = lambda *args, **kwargs: {}
    try:
        with regions_off():
            yield
    finally:
        tile_pass.row_gathers, tile_pass.tiled_steps = row_gathers, tiled_steps


def smallest_cap(model: str) -> tuple[int, str | None]:
    try:
        hyperion.compile(model, memory_limit=1, mode="adaptive")
    except hyperion.MemoryLimitError as refusal:
        return refusal.smallest_limit_bytes, refusal.node
    return 1, None


def _median(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _op_alone(model_path: str, source: Any, step: Any, schedule: Any) -> tuple[ort.InferenceSession, dict]:
    """The step's node alone in plain onnxruntime, its weights whole, and inputs of its shapes."""
    node = nodes_by_name(source)[step.node]
    initializers = {t.name: t for t in source.proto.graph.initializer}
    rng = np.random.default_rng(0)
    inputs, declared = {}, []
    for name in node.input:
        if not name or name in initializers:
            continue
        record = schedule.tensors[name]
        shape = tuple(int(d) for d in record.shape)
        if record.dtype.startswith("int"):
            rows = schedule.tensors[step.row_gather.weight].shape[0] if step.row_gather else 2
            inputs[name] = rng.integers(0, rows, shape).astype(record.dtype)
        else:
            inputs[name] = rng.standard_normal(shape).astype(record.dtype)
        declared.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(record.dtype)), list(shape)))
    graph = onnx.helper.make_graph([node], "op", declared, [onnx.ValueInfoProto(name=o) for o in node.output],
                                   [initializers[n] for n in node.input if n in initializers])
    model = onnx.helper.make_model(graph, opset_imports=list(source.proto.opset_import))
    options = session_options(external_folder=Path(model_path).parent)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), inputs


def _chain_alone(source: Any, segment: Any, schedule: Any) -> tuple[ort.InferenceSession, dict]:
    """A region's steps whole in plain onnxruntime: its segment's model, untiled, on inputs of its shapes."""
    initializers = {t.name: t for t in source.proto.graph.initializer}
    # Every weight fed (random, of its shape): weights import computed (folded into
    # Hyperion's weight cache, outside the model's folder) cannot be initializers here.
    segment = dataclasses.replace(segment, fed_weights=tuple(segment.weights))
    model = build_segment_model(source, schedule, segment, nodes_by_name(source), initializers)
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal(tuple(int(d) for d in schedule.tensors[name].shape)).astype(
        schedule.tensors[name].dtype) for name in (*segment.model_inputs, *segment.fed_weights)}
    options = session_options(external_folder=Path(source.path).parent)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), inputs


def _timed(run: Any) -> float:
    started = time.perf_counter()
    run()
    return 1e3 * (time.perf_counter() - started)


def latency(entry: dict[str, Any], cap: int, repeats: int) -> dict[str, Any]:
    path = entry["path"]
    cm = hyperion.compile(path, memory_limit=cap, mode="adaptive")
    schedule = cm.schedule
    split = [s for s in schedule.steps if s.tiles is not None or s.row_gather is not None]
    feeds = corpus_feeds(entry)
    plain = ort.InferenceSession(path, session_options(threads=0), providers=["CPUExecutionProvider"])
    source = load_source(path)
    regions = [s for s in schedule.segments if s.region is not None]
    alone = {s.segment: _op_alone(path, source, s, schedule) for s in split}
    alone |= {s.index: _chain_alone(source, s, schedule) for s in regions}
    ours_out = cm.run(feeds)
    names = [o.name for o in plain.get_outputs()]
    error = max(float(np.max(np.abs(ours_out[n].astype(np.float64) - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
                for n, ref in zip(names, plain.run(names, feeds), strict=True))
    del ours_out
    for session, inputs in alone.values():
        session.run(None, inputs)
    ours, theirs = [], []
    segment_ms: dict[int, list[float]] = {index: [] for index in alone}
    op_ms: dict[int, list[float]] = {index: [] for index in alone}
    for _ in range(repeats):
        ours.append(_timed(lambda: cm.run(feeds)))
        for index in alone:
            segment_ms[index].append(cm.stats.segment_ms[index])
        theirs.append(_timed(lambda: plain.run(None, feeds)))
        for index, (session, inputs) in alone.items():
            op_ms[index].append(_timed(lambda: session.run(None, inputs)))  # noqa: B023
    steps = []
    for step in split:
        kind = (f"{len(step.tiles.bounds) - 1} tiles" if step.tiles is not None
                else f"rows ({step.row_gather.read_bytes / MIB:.2f} MiB)")
        steps.append({"index": step.index, "node": step.node, "op": step.op_type, "split": kind,
                      "hyperion_ms": _median(segment_ms[step.segment]), "onnxruntime_ms": _median(op_ms[step.segment])})
    for segment in regions:
        first = schedule.steps[segment.first_step]
        ops = "-".join(schedule.steps[i].op_type for i in segment.steps)
        unit = "patches of rows" if segment.region.patches is not None else "tiles"
        kind = f"region: {len(segment.region.bounds) - 1} {unit} of {segment.region.size}"
        steps.append({"index": first.index, "node": first.node, "op": ops, "split": kind,
                      "hyperion_ms": _median(segment_ms[segment.index]),
                      "onnxruntime_ms": _median(op_ms[segment.index])})
    cm.close()
    return {"cap_bytes": cap, "mode": str(schedule.mode), "peak_bytes": schedule.peak_bytes,
            "segments": len(schedule.segments), "run_ms": _median(ours), "onnxruntime_run_ms": _median(theirs),
            "max_relative_error": error,
            "split_steps": steps}


def measure(entry: dict[str, Any], repeats: int) -> dict[str, Any]:
    path = entry["path"]
    uncapped = hyperion.compile(path, memory_limit=None, mode="adaptive").schedule.peak_bytes
    with tile_pass_off():
        before, before_node = smallest_cap(path)
    with regions_off():
        weight_tiles, _ = smallest_cap(path)
    with patches_off():
        free_axes, free_axes_node = smallest_cap(path)
    after, after_node = smallest_cap(path)
    result: dict[str, Any] = {"uncapped_peak_bytes": uncapped, "smallest_before_bytes": before,
                              "smallest_before_node": before_node, "smallest_weight_tiles_bytes": weight_tiles,
                              "smallest_free_axes_bytes": free_axes, "smallest_free_axes_node": free_axes_node,
                              "smallest_after_bytes": after, "smallest_after_node": after_node}
    if after < max(before, free_axes):
        # Midway to the smallest cap without patches when they lower it (only they meet it),
        # else without the tile pass.
        cap = (free_axes + after) // 2 if after < free_axes else (before + after) // 2
        try:
            hyperion.compile(path, memory_limit=cap, mode="adaptive")
        except hyperion.MemoryLimitError as refusal:   # sessions' bookkeeping can need more than one step
            cap = refusal.smallest_limit_bytes
        result["latency"] = latency(entry, cap, repeats) if cap < max(before, free_axes) else None
    return result


def _range(figure: dict[str, float]) -> str:
    return f"{figure['median']:.1f} ({figure['min']:.1f}-{figure['max']:.1f})"


def tables(results: dict[str, dict[str, Any]]) -> str:
    def cap(r: dict[str, Any], key: str) -> str:
        return f"{r[key] / MIB:.1f} MiB ({r[key] / r['uncapped_peak_bytes']:.0%})"

    caps = markdown_table(
        ["model", "uncapped peak", "smallest cap before", "with weight tiles", "with regions (free axes)",
         "with spatial patches too", "set after by"],
        [[name, f"{r['uncapped_peak_bytes'] / MIB:.1f} MiB", cap(r, "smallest_before_bytes"),
          cap(r, "smallest_weight_tiles_bytes"), cap(r, "smallest_free_axes_bytes"), cap(r, "smallest_after_bytes"),
          f"`{r['smallest_after_node']}`"]
         for name, r in results.items()])
    rows = []
    for name, r in results.items():
        run = r.get("latency")
        if run is None:
            continue
        for step in run["split_steps"]:
            ratio = step["hyperion_ms"]["median"] / step["onnxruntime_ms"]["median"]
            rows.append([name, f"{run['cap_bytes'] / MIB:.1f} MiB", f"`{step['node']}` {step['op']}", step["split"],
                         _range(step["hyperion_ms"]), _range(step["onnxruntime_ms"]), f"{ratio:.2f}x"])
        ratio = run["run_ms"]["median"] / run["onnxruntime_run_ms"]["median"]
        rows.append([name, f"{run['cap_bytes'] / MIB:.1f} MiB", f"whole run ({run['segments']} segments; outputs "
                     f"within {run['max_relative_error']:.1e} of onnxruntime's, relative to their largest)", "",
                     _range(run["run_ms"]), _range(run["onnxruntime_run_ms"]), f"{ratio:.2f}x"])
    latencies = markdown_table(["model", "cap", "step", "split", "Hyperion ms", "onnxruntime ms", "ratio"], rows)
    return f"{caps}\n\n{latencies}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO / "corpus" / "models")
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "tiling.json")
    args = parser.parse_args()
    manifest = load_manifest(args.corpus)
    names = args.only.split(",") if args.only else [n for n in DEFAULT_MODELS if n in manifest]
    results = {}
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = measure(manifest[name], args.repeats)
    print(tables(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "repeats": args.repeats, "models": results},
                                    indent=1) + "\n")


if __name__ == "__main__":
    main()
