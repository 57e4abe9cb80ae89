"""What a session kept across runs holds, by kind and node count (``passes/memory/costs.py``).

Every figure is one fresh subprocess: it compiles a synthetic model in fed memory_opt under a
cap that leaves it whole (``prepack_weights=False``, ``max_segment_steps`` = the node count),
turns the schedule into the kind measured -- only fields the runtime reads, so the runtime
builds exactly the sessions it would for such a plan -- then reads VmRSS before the first
run and after the second (steady state: every session built and kept). The kept sessions'
share is the slope of that growth over the number of sessions (``--counts``, two or more),
so what the first session pages in once (onnxruntime's code, about 9 MiB) drops out.

Kinds:

* ``fed``: a plain fed segment, its weights inputs handed mapped views every run;
* ``relaid``: a relaid segment, packed once by onnxruntime's optimizer, mapped;
* ``cached``: a fed plan's weight cache, its weights initializers (their bytes subtracted);
* ``region``: a segment run tile by tile along a free axis (one session, symbolic axis);
* ``fed_tile``, ``relaid_tile``: a tiled MatMul's one-node sessions (one per width, fed;
  one per tile, relaid).

The segments chain ``Conv -> Sigmoid -> Mul`` blocks (a CNN's SiLU) of 16 channels at 16x16,
each Conv weight 9 KiB (fed: above ``SMALL_TENSOR_BYTES``); tiles split 1024x1024 MatMuls
(``--counts`` of them: as many sessions as tiles, or tile widths).

    python benchmarks/session_rss.py [--nodes 3,12,48,192] [--counts 4,16] [--kinds fed,relaid,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
CHANNELS, SIDE, MATMUL = 16, 16, 1024
TILE_STEPS = (2, 4)
KINDS = ("fed", "relaid", "cached", "region", "fed_tile", "relaid_tile")


def silu_chain(path: Path, blocks: int) -> None:
    """``blocks`` of Conv 3x3 -> Sigmoid -> Mul, weights in one external-data file."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for i in range(blocks):
        weight = numpy_helper.from_array(rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) * 0.1,
                                         f"w{i}")
        weights.append(weight)
        nodes += [helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"]),
                  helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"y{i}"])]
        previous = f"y{i}"
    nodes[-1].output[0] = "y"
    shape = [1, CHANNELS, SIDE, SIDE]
    _save(path, nodes, weights, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])


def matmul_chain(path: Path, steps: int) -> None:
    """``steps`` MatMuls of [8, 1024] by 1024x1024 weights (4 MiB each, tiled under a 3.5 MiB cap),
    with a Relu between."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for i in range(steps):
        weights.append(numpy_helper.from_array(rng.standard_normal((MATMUL, MATMUL)).astype(np.float32) * 0.04,
                                               f"w{i}"))
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"y{i}"])]
        previous = f"y{i}"
    nodes[-1].output[0] = "y"
    _save(path, nodes, weights, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, MATMUL])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, MATMUL])])


def _save(path: Path, nodes: list, weights: list, inputs: list, outputs: list) -> None:
    model = helper.make_model(helper.make_graph(nodes, "chain", inputs, outputs, weights),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


# The child: compile, turn the schedule into the kind measured, run twice, report VmRSS.
CHILD = """
import dataclasses, json, sys
import numpy as np
import hyperion
from hyperion.runtime.executor import Runtime
from hyperion.schedule import Region

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

path, kind, nodes, shape = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
tiles = kind.endswith("tile")
cap = 7 * 2**19 if tiles else 256 * 2**20
cm = hyperion.compile(path, memory_limit=cap, mode="memory_opt", prepack_weights=False,
                      max_segment_steps=None if tiles else nodes, weight_cache=None if kind == "cached" else 0)
active = cm._active().runtime
schedule = active.schedule
segments, steps = list(schedule.segments), list(schedule.steps)
held = 0
for i, segment in enumerate(segments):
    first = steps[segment.first_step]
    if kind == "fed":
        segments[i] = dataclasses.replace(segment, relaid=False)
    elif kind == "cached":
        segments[i] = dataclasses.replace(segment, relaid=False, cached=True, fed_weights=())
        held += segment.held_bytes
    elif kind == "region":
        # The tiled axis: the batch of a [1, C, H, W] chain, one tile (one session all the same).
        segments[i] = dataclasses.replace(segment, relaid=False, region=Region(
            size=1, bounds=(0, 1), sliced={n: 0 for n in segment.model_inputs if n not in segment.fed_weights},
            outputs={n: 0 for n in segment.outputs}, staging_bytes=0))
    elif first.tiles is not None:
        relaid = kind == "relaid_tile"
        steps[segment.first_step] = dataclasses.replace(first, tiles=dataclasses.replace(
            first.tiles, relaid=relaid, fed=not relaid))
schedule = dataclasses.replace(schedule, segments=tuple(segments), steps=tuple(steps))
runtime = Runtime(active.source, schedule, active.config)
feeds = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
before = rss()
for _ in range(2):
    runtime.run(feeds)
after = rss()
tile_sessions = len(runtime._tile_sessions)
kept_nodes = [len(s.steps) for s in schedule.segments if s.persistent and steps[s.first_step].tiles is None]
print(json.dumps({"grown": after - before - held, "segments": len(schedule.segments),
                  "tile_sessions": tile_sessions, "kept_nodes": kept_nodes}))
"""


def measure(kind: str, nodes: int, count: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "chain.onnx"
        if kind.endswith("tile"):
            matmul_chain(path, count)
            shape = [8, MATMUL]
        else:
            silu_chain(path, nodes * count // 3)
            shape = [1, CHANNELS, SIDE, SIDE]
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), kind, str(nodes), json.dumps(shape)],
                             capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{kind}, {nodes} nodes, {count} sessions: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="3,12,48,192")
    parser.add_argument("--counts", default="4,16")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print("| kind | nodes per session | sessions | KiB per kept session (median, min-max) |")
    print("|---|---|---|---|")
    for kind in args.kinds.split(","):
        for nodes in [1] if kind.endswith("tile") else [int(n) for n in args.nodes.split(",")]:
            slopes = []
            for _ in range(args.repeats):
                # Tiles: MatMuls, each a few tile sessions (and a Relu segment, counted in).
                runs = [measure(kind, nodes, count) for count in (TILE_STEPS if kind.endswith("tile") else counts)]
                sessions = [r["tile_sessions"] if kind.endswith("tile") else r["segments"] for r in runs]
                slope = np.polyfit(sessions, [r["grown"] for r in runs], 1)[0]
                slopes.append(slope / 1024)
            print(f"| {kind} | {nodes} | {'/'.join(map(str, sessions))} | {np.median(slopes):.0f} "
                  f"({min(slopes):.0f}-{max(slopes):.0f}) |", flush=True)


if __name__ == "__main__":
    main()
