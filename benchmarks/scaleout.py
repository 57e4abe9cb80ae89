"""Scale-out throughput: a model ~3x the per-stage cap, streamed on one process or spread over stages.

    python benchmarks/scaleout.py [--repeats N] [--batch B] [--model-dir DIR]

Model: 60 x (MatMul 1280x1280 -> Relu), 393 MB of external-data weights (written to a
temporary folder, or DIR, and reused). The per-stage cap is the smallest under which
``hyperion.partition`` keeps 3 stages resident (what PartitionError names), rounded up to
a MiB: each stage holds a third of the weights plus the original of the weight being packed.

Rows, samples per second for a batch of B split into m = 1, 4, 16 micro-batches:

(a) one process, ``hyperion.compile(memory_limit=cap, mode="adaptive")`` (memory_opt: weights
    streamed from the page cache), the micro-batches run one after another;
(b) ``RayPipeline`` of 3 resident stage actors (1 onnxruntime thread each), micro-batches
    overlapping;
(c) 2 data-parallel Ray actors, each the whole model under the cap (memory_opt), micro-batches
    dealt out round-robin (resident replicas would need the whole model each: they do not fit);
(u) one uncapped process holding the whole model (onnxruntime's default threads), the same
    micro-batches one after another (m = 1: the whole batch in one run, the target); (u1) the
    same with one onnxruntime thread, as each stage has.

The model of throughput for N hosts: stage k takes t_k per micro-batch (measured alone, on
its actor, call overhead included) plus its output bytes over the link's bandwidth: s_k. The
first micro-batch passes every stage, the others follow the slowest: T = sum_k s_k + (m - 1)
* max_k s_k; with equal stages (m + N - 1) * s, a bubble fraction (N - 1) / (m + N - 1). On
one host, where the N stages share the cores and the memory bandwidth, a run is also no
faster than m times W, the host's time to do one micro-batch of every stage at once
(measured: the N calls submitted together): T_1 = max(sum_k t_k + (m - 1) * max_k t_k, m * W).
Printed next to the measured figure (Markdown). Every run is repeated; medians and the range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYERS, HIDDEN = 60, 1280
STAGES = 3
MICRO_BATCHES = (1, 4, 16)
BANDWIDTH_BYTES_PER_S = 1.25e9      # a 10 Gbit/s link between hosts, for the N-host column


def model_in(folder: Path) -> Path:
    from fixtures.streaming_mlp import build_streaming_mlp

    path = folder / f"scaleout_mlp_{LAYERS}x{HIDDEN}.onnx"
    return path if path.exists() else build_streaming_mlp(path, layers=LAYERS, hidden=HIDDEN)


def parts_of(batch: int, count: int) -> list[dict]:
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch, HIDDEN)).astype(np.float32)
    return [{"x": part} for part in np.array_split(x, count)]


def _stats(times: list[float], samples: int) -> dict:
    rates = sorted(samples / t for t in times)
    return {"median": statistics.median(rates), "low": rates[0], "high": rates[-1]}


# -- one process (a child, so its peak RSS is its own) ---------------------------------------
def _process_child(spec: dict) -> dict:
    import onnxruntime  # noqa: F401  (the baseline imports both)

    import hyperion
    from hyperion.tools.rss import peak_rss_bytes

    baseline = peak_rss_bytes()
    out = {}
    for m in spec["micro_batches"]:
        parts = parts_of(spec["batch"], m)
        shapes = {"x": list(parts[0]["x"].shape)}
        model = hyperion.compile(spec["model"], memory_limit=spec["cap"], mode="adaptive", input_shapes=shapes,
                                 intra_op_num_threads=spec.get("threads", 0))
        for part in parts:   # warm up (every micro-batch shape planned)
            model.run(part)
        times = []
        for _ in range(spec["repeats"]):
            started = time.perf_counter()
            for part in parts:
                model.run(part)
            times.append(time.perf_counter() - started)
        out[str(m)] = _stats(times, spec["batch"])
        out["mode"] = model.schedule.mode.value
    out["rss"] = peak_rss_bytes() - baseline
    return out


def run_process(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- on Ray -----------------------------------------------------------------------------------
def run_pipeline(model: Path, cap: int, batch: int, repeats: int) -> tuple[dict, list[dict], list[int], list[str]]:
    import ray

    from hyperion.ray import RayPipeline

    out, stage_times = {}, []
    for m in MICRO_BATCHES:
        parts = parts_of(batch, m)
        with RayPipeline(model, STAGES, cap, timeout_s=600, input_shapes={"x": list(parts[0]["x"].shape)}) as pipe:
            pipe.run_batches(parts)   # warm up: sessions built, weights resident
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                pipe.run_batches(parts)
                times.append(time.perf_counter() - started)
            out[str(m)] = _stats(times, batch)
            stage_times.append(_stage_times(ray, pipe, parts[0], repeats))
            rss, modes = pipe.stage_peak_rss_bytes(), pipe.stage_modes()
    return out, stage_times, rss, modes


def _stage_times(ray, pipe, feeds: dict, repeats: int) -> dict:
    """Each stage alone on one micro-batch (seconds, median), the bytes it sends on, and the
    host's time to do one micro-batch of every stage at once (all stages' calls together)."""
    seconds, sent, received = [], [], [feeds]
    for actor in pipe.actors:
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = ray.get(actor.run.remote(*received[-1:]))
            samples.append(time.perf_counter() - started)
        seconds.append(statistics.median(samples))
        sent.append(sum(v.nbytes for v in result.values()))
        received.append(result)
    together = []
    for _ in range(repeats):
        started = time.perf_counter()
        ray.get([actor.run.remote(received[k]) for k, actor in enumerate(pipe.actors)])
        together.append(time.perf_counter() - started)
    return {"seconds": seconds, "bytes": sent, "together": statistics.median(together)}


def run_data_parallel(model: Path, cap: int, batch: int, repeats: int, actors: int = 2) -> tuple[dict, list[int]]:
    import ray

    from hyperion.ray.data import ModelPredictor

    out, rss = {}, []
    for m in MICRO_BATCHES:
        parts = parts_of(batch, m)
        replica = ray.remote(ModelPredictor).options(num_cpus=1, memory=cap)
        pool = [replica.remote(str(model), cap, "adaptive", 1, None, {"x": list(parts[0]["x"].shape)})
                for _ in range(actors)]

        def run_all(pool=pool, parts=parts) -> list:
            return ray.get([pool[i % len(pool)].__call__.remote(part) for i, part in enumerate(parts)])

        run_all()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            results = run_all()
            times.append(time.perf_counter() - started)
        out[str(m)] = _stats(times, batch)
        rss = [int(r["hyperion_peak_rss_bytes"][0]) for r in results[:actors]]
        for actor in pool:
            ray.kill(actor)
    return out, rss


# -- the model of throughput ------------------------------------------------------------------
def pipeline_seconds(per_stage: list[float], m: int) -> float:
    """GPipe: the first micro-batch goes through every stage, the others follow the slowest."""
    return sum(per_stage) + (m - 1) * max(per_stage)


def predicted_one_host(stage: dict, m: int, batch: int) -> float:
    return batch / max(pipeline_seconds(stage["seconds"], m), m * stage["together"])


def predicted_hosts(stage: dict, m: int, batch: int) -> float:
    per_stage = [s + b / BANDWIDTH_BYTES_PER_S for s, b in zip(stage["seconds"], stage["bytes"], strict=True)]
    return batch / pipeline_seconds(per_stage, m)


def _cell(stats: dict) -> str:
    return f"{stats['median']:.1f} ({stats['low']:.1f}-{stats['high']:.1f})"


def smallest_resident_cap(model: Path, batch: int) -> int:
    import hyperion

    try:
        hyperion.partition(model, STAGES, 1, input_shapes={"x": [batch, HIDDEN]}, require_resident=True)
    except hyperion.PartitionError as error:
        return -(-error.smallest_limit_bytes // 2**20) * 2**20
    raise AssertionError("a 1-byte cap fitted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model-dir", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_process_child(json.loads(args.child))))
        return
    folder = args.model_dir or Path(tempfile.mkdtemp(prefix="hyperion-scaleout-"))
    model = model_in(folder)
    weights = LAYERS * HIDDEN * HIDDEN * 4
    cap = smallest_resident_cap(model, args.batch)
    spec = {"model": str(model), "batch": args.batch, "repeats": args.repeats, "micro_batches": list(MICRO_BATCHES)}
    streamed = run_process({**spec, "cap": cap})
    uncapped = run_process({**spec, "cap": None})
    one_thread = run_process({**spec, "cap": None, "threads": 1})
    import ray

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        piped, stage_times, stage_rss, modes = run_pipeline(model, cap, args.batch, args.repeats)
        parallel, parallel_rss = run_data_parallel(model, cap, args.batch, args.repeats)
    finally:
        ray.shutdown()
    print(f"model: {LAYERS} x (MatMul {HIDDEN}x{HIDDEN} -> Relu), {weights / 1e6:.0f} MB of weights; per-stage cap "
          f"{cap / 2**20:.0f} MiB (weights = {weights / cap:.2f}x the cap); batch {args.batch}; {cores} cores; "
          f"medians of {args.repeats} runs (range)\n")
    print("| samples/s | " + " | ".join(f"m = {m}" for m in MICRO_BATCHES) + " | peak RSS above baseline |")
    print("|---|" + "---|" * (len(MICRO_BATCHES) + 1))
    print(f"| (a) one process under the cap ({streamed['mode']}) | "
          + " | ".join(_cell(streamed[str(m)]) for m in MICRO_BATCHES) + f" | {streamed['rss'] / 2**20:.0f} MiB |")
    print(f"| (b) {STAGES}-stage Ray pipeline ({', '.join(modes)}) | "
          + " | ".join(_cell(piped[str(m)]) for m in MICRO_BATCHES)
          + f" | {' / '.join(f'{r / 2**20:.0f}' for r in stage_rss)} MiB per stage |")
    print("| (c) 2 data-parallel actors under the cap | " + " | ".join(_cell(parallel[str(m)]) for m in MICRO_BATCHES)
          + f" | {' / '.join(f'{r / 2**20:.0f}' for r in parallel_rss)} MiB per actor |")
    print("| (u) one uncapped process | " + " | ".join(_cell(uncapped[str(m)]) for m in MICRO_BATCHES)
          + f" | {uncapped['rss'] / 2**20:.0f} MiB |")
    print("| (u1) one uncapped process, 1 onnxruntime thread | "
          + " | ".join(_cell(one_thread[str(m)]) for m in MICRO_BATCHES) + f" | {one_thread['rss'] / 2**20:.0f} MiB |")
    print(f"\n(b) at m = 16 / (u) on the whole batch in one run (m = 1): "
          f"{piped['16']['median'] / uncapped['1']['median']:.2f}x; / (u) at m = 16: "
          f"{piped['16']['median'] / uncapped['16']['median']:.2f}x\n")
    print("| m | stage ms per micro-batch (alone) | all stages at once, ms | bubble | predicted, this host "
          "| measured (b) | error "
          f"| predicted, {STAGES} hosts |")
    print("|---|---|---|---|---|---|---|---|")
    for m, stage in zip(MICRO_BATCHES, stage_times, strict=True):
        one_host = predicted_one_host(stage, m, args.batch)
        measured = piped[str(m)]["median"]
        print(f"| {m} | {' / '.join(f'{1e3 * s:.1f}' for s in stage['seconds'])} | {1e3 * stage['together']:.1f} "
              f"| {(STAGES - 1) / (m + STAGES - 1):.0%} | {one_host:.1f} | {measured:.1f} "
              f"| {100 * (one_host - measured) / measured:+.0f}% | {predicted_hosts(stage, m, args.batch):.1f} |")


if __name__ == "__main__":
    main()
