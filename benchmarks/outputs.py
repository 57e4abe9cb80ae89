"""The figures of docs/onnxruntime_users.md: a script moved from onnxruntime to
``hyperion.InferenceSession``, and what asking for fewer outputs saves.

The model is ``fixtures._encoder.build_encoder`` at BERT-small-like size (6 layers,
hidden 384, 6 heads, FFN 1536, vocabulary 8000: 55 MB of weights), returning
``logits`` and, as transformers does with ``output_hidden_states=True,
output_attentions=True``, 7 hidden states and 6 attention maps. Every figure comes
from a fresh subprocess: peak RSS (VmHWM) minus that of a process that only
imports hyperion, onnxruntime and numpy, and the fastest and median latency of ``--repeats``
steady-state runs, interleaved config by config in one process (a shared
machine's load then hits every config alike).

    python benchmarks/outputs.py            # both tables, Markdown
    python benchmarks/outputs.py --quick    # a smaller model, fewer repeats
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"layers": 6, "hidden": 384, "heads": 6, "ffn": 1536, "vocab": 8000}
QUICK_SIZES = {"layers": 2, "hidden": 128, "heads": 4, "ffn": 512, "vocab": 2000}
BATCH, SEQ = 8, 256


def build_model(folder: Path, quick: bool) -> Path:
    import onnx

    from fixtures._encoder import build_encoder

    path = folder / "encoder_large.onnx"
    onnx.save_model(build_encoder(21, name="encoder_large", **(QUICK_SIZES if quick else SIZES)), path)
    return path


def child(args: dict) -> dict:
    """One measurement in this (fresh) process; see :func:`measure`."""
    import numpy as np
    import onnxruntime as ort

    import hyperion
    from hyperion.tools.rss import peak_rss_bytes

    result: dict = {}
    if args["kind"] != "baseline":
        rng = np.random.default_rng(0)
        feeds = {"input_ids": rng.integers(0, args["vocab"], size=(BATCH, SEQ)).astype(np.int64)}
        if args["kind"] == "ort":
            sess = ort.InferenceSession(args["model"], providers=["CPUExecutionProvider"])
        else:
            sess = hyperion.InferenceSession(args["model"], providers=["CPUExecutionProvider"],
                                             memory_limit=args["limit"], mode=args["mode"])
        outputs = args["outputs"]
        started = time.perf_counter()
        sess.run(outputs, feeds)
        result["first_ms"] = 1e3 * (time.perf_counter() - started)
        samples = []
        for _ in range(args["repeats"]):
            started = time.perf_counter()
            sess.run(outputs, feeds)
            samples.append(time.perf_counter() - started)
        result["ms"] = 1e3 * statistics.median(samples) if samples else None
        if args["kind"] == "hyperion":
            result["peak_bytes"] = sess.schedule.peak_bytes
            result["plan_mode"] = str(sess.schedule.mode)
            result["steps"] = len(sess.schedule.steps)
            result["segments"] = len(sess.schedule.segments)
    result["rss"] = peak_rss_bytes()
    return result


def measure(model: Path, kind: str, *, outputs: list[str] | None = None, limit: str | None = None,
            mode: str = "adaptive", repeats: int = 5, vocab: int = SIZES["vocab"]) -> dict:
    args = {"kind": kind, "model": str(model), "outputs": outputs, "limit": limit, "mode": mode,
            "repeats": repeats, "vocab": vocab}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                          env=env, check=False, cwd=REPO)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1]
        raise RuntimeError(f"{kind} {outputs} {limit}: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def refusal(message: str) -> str:
    """The one figure of a MemoryLimitError worth a table cell: the smallest cap that works."""
    found = re.search(r"smallest limit that works in \w+ mode is \d+ bytes \(([^)]*)\)", message)
    return f"refused: needs at least {found.group(1)}" if found else f"refused: {message[:80]}"


def interleaved_ms(model: Path, configs: list[Config], repeats: int,
                   vocab: int) -> dict[str, tuple[float, float]]:
    """(Fastest, median) steady-state latency of every config, its runs interleaved round by round in this
    process (so a load that comes and goes on a shared machine hits every config alike)."""
    import numpy as np
    import onnxruntime as ort

    import hyperion

    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, vocab, size=(BATCH, SEQ)).astype(np.int64)}
    runs = {}
    for config in configs:
        if config.kind == "ort":
            sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        else:
            try:
                sess = hyperion.InferenceSession(str(model), memory_limit=config.limit)
                sess.run(config.outputs, feeds)
            except hyperion.MemoryLimitError:
                continue
        runs[config.label] = functools.partial(sess.run, config.outputs, feeds)
    samples: dict[str, list[float]] = {label: [] for label in runs}
    for run in runs.values():
        run()  # warm
    for _ in range(repeats):
        for label, run in runs.items():
            started = time.perf_counter()
            run()
            samples[label].append(time.perf_counter() - started)
    return {label: (1e3 * min(values), 1e3 * statistics.median(values)) for label, values in samples.items()}


@dataclass(frozen=True)
class Config:
    label: str
    kind: str
    outputs: list[str] | None = None
    limit: str | None = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--limit", action="append", help="a cap of the capped rows (repeatable; default: "
                        "96MiB, which only the logits plan meets, and 140MiB)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from hyperion.tools.report import markdown_table

    repeats = 3 if args.quick else args.repeats
    limits = args.limit or (["24MiB", "40MiB"] if args.quick else ["96MiB", "140MiB"])
    vocab = (QUICK_SIZES if args.quick else SIZES)["vocab"]
    drop_in = [Config("ort.InferenceSession, run(['logits'])", "ort", ["logits"]),
               Config("hyperion.InferenceSession, no cap, run(['logits'])", "hyperion", ["logits"]),
               Config(f"hyperion.InferenceSession, memory_limit={limits[0]}, run(['logits'])", "hyperion",
                      ["logits"], limits[0])]
    outputs = [Config("ort, run(None): all 14 outputs", "ort")]
    for limit in (None, *limits):
        cap = "no cap" if limit is None else f"memory_limit={limit}"
        outputs += [Config(f"hyperion {cap}, run(None): all 14 outputs", "hyperion", None, limit),
                    Config(f"hyperion {cap}, run(['logits'])", "hyperion", ["logits"], limit),
                    Config(f"hyperion {cap}, run(['hidden_state_2'])", "hyperion", ["hidden_state_2"], limit)]
    with tempfile.TemporaryDirectory(prefix="hyperion-outputs-") as tmp:
        model = build_model(Path(tmp), args.quick)
        size = model.stat().st_size
        base = measure(model, "baseline")["rss"]
        latency = interleaved_ms(model, drop_in + outputs, repeats, vocab)

        def row(config: Config) -> list[str]:
            try:
                m = measure(model, config.kind, outputs=config.outputs, limit=config.limit, repeats=0, vocab=vocab)
            except RuntimeError as exc:  # a cap no plan meets: compile refuses, naming the smallest
                return [config.label, refusal(str(exc)), "-", "-", "-"]
            plan = (f"{m['plan_mode']}, {m['segments']} seg, peak {mib(m['peak_bytes'])}" if "peak_bytes" in m
                    else "-")
            print(f"measured {config.label}", file=sys.stderr)
            return [config.label, plan, mib(m["rss"] - base), "{:.0f} ({:.0f})".format(*latency[config.label]),
                    f"{m['first_ms']:.0f}"]

        header = ("run", "Hyperion plan", "peak RSS above imports", "latency ms: fastest (median)", "first run ms")
        print(f"model: {model.name}, {mib(size)}, batch {BATCH} x seq {SEQ}\n")
        print("Drop-in (the script asks for logits):\n")
        print(markdown_table(header, [row(c) for c in drop_in]))
        print("\nOnly the outputs asked for:\n")
        print(markdown_table(header, [row(c) for c in outputs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
