"""The shared onnxruntime arena a capped plan keeps between runs (segment rule 14): runs after
the first fault no activation in again, give the same outputs, and the schedule decides it."""

from __future__ import annotations

import json

from tests.conftest import run_python

RUNS = """
import dataclasses, json, resource, sys
import numpy as np
import hyperion
from fixtures import example_feeds

compiled = hyperion.compile("hyperion/data/demo.onnx", memory_limit="12MB", mode="memory_opt",
                            input_shapes={"image": [8, 3, 64, 64]})
feeds = example_feeds("demo", batch=8)

def faults_and_outputs(model):
    first = model.run(feeds)
    model.run(feeds)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        later = model.run(feeds)
    assert all(np.array_equal(first[name], later[name]) for name in first)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3, first, model.stats.sessions.built

# The same plan, its arena given up in the schedule: the runtime does what the schedule says.
returned = hyperion.load("hyperion/data/demo.onnx", dataclasses.replace(compiled.schedule, kept_heap_bytes=0))
faults_returned, outputs_returned, _ = faults_and_outputs(returned)
faults_kept, outputs_kept, built = faults_and_outputs(compiled)
equal = all(np.array_equal(outputs_kept[name], outputs_returned[name]) for name in outputs_kept)
print(json.dumps({"kept_bytes": compiled.schedule.kept_heap_bytes, "faults_kept": faults_kept,
                  "faults_returned": faults_returned, "equal": equal, "built": built}))
"""


def test_runs_on_the_kept_arena_fault_nothing_in_and_give_the_same_outputs() -> None:
    report = json.loads(run_python(RUNS))
    assert report["kept_bytes"] > 0          # the plan keeps the arena at this cap
    assert report["built"] == 0              # later runs build nothing
    assert report["equal"]                   # the same kernels on other memory: the same bits
    # With its blocks returned, every run faults the demo's activations in again (about 900
    # pages); on the kept arena, the pages stay.
    assert report["faults_returned"] > 200
    assert report["faults_kept"] < report["faults_returned"] / 10


def test_inspect_says_when_the_sessions_share_a_kept_arena() -> None:
    import hyperion
    from hyperion.tools.report import summary

    schedule = hyperion.compile("hyperion/data/demo.onnx", memory_limit="12MB", mode="memory_opt",
                                input_shapes={"image": [8, 3, 64, 64]}).schedule
    assert "share an arena of 6.0 MiB" in summary(schedule)
    uncapped = hyperion.compile("hyperion/data/demo.onnx", input_shapes={"image": [8, 3, 64, 64]}).schedule
    assert "share an arena" not in summary(uncapped)


def test_adaptive_streams_the_weights_when_only_that_leaves_room_for_the_arena() -> None:
    # The light ShuffleNet at 12 MiB (half of onnxruntime's RSS on it): normal mode fits, but
    # with every weight resident no arena does, so each run would fault its activations in.
    # memory_opt keeps a 5.3 MiB arena and maps fewer weight bytes again than normal faults.
    from pathlib import Path

    import onnx

    import hyperion

    model = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_shufflenet.onnx"
    cap = 12 * 2**20
    normal = hyperion.compile(model, memory_limit=cap, mode="normal").schedule
    assert normal.kept_heap_bytes == 0
    chosen = hyperion.compile(model, memory_limit=cap).schedule
    assert chosen.mode == "memory_opt" and chosen.kept_heap_bytes > 0 and chosen.peak_bytes <= cap
    assert "leaves no room to keep an arena between runs" in chosen.mode_reason
