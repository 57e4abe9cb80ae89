"""What faulting a step's tensors in costs: one attention tile under glibc's two heap settings.

Under a cap that keeps no heap, Hyperion fixes glibc's mmap threshold at 1 MiB, so every
large intermediate tensor is mapped on allocation and its pages faulted in on every run;
a plan that keeps its heap sets 32 MiB, and freed blocks are reused. This times plain
onnxruntime (arena off, as under a cap) on whisper-tiny's encoder attention as one region
tile runs it -- 3 heads, 1500 tokens: MatMul, scale, Softmax, MatMul -- alternating the two
settings in one process.

    python benchmarks/heap_faults.py [--heads 3] [--tokens 1500] [--rounds 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from hyperion.runtime import sessions


def attention(heads: int, tokens: int, dim: int = 64) -> bytes:
    f = TensorProto.FLOAT
    graph = helper.make_graph([
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["m"]),
        helper.make_node("Softmax", ["m"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"])], "attention",
        [helper.make_tensor_value_info("q", f, [1, heads, tokens, dim]),
         helper.make_tensor_value_info("kt", f, [1, heads, dim, tokens]),
         helper.make_tensor_value_info("v", f, [1, heads, tokens, dim])],
        [helper.make_tensor_value_info("y", f, [1, heads, tokens, dim])],
        [helper.make_tensor("scale", f, [], [dim ** -0.5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    session = ort.InferenceSession(attention(args.heads, args.tokens),
                                   sessions.session_options(threads=2, arena=False, spinning=False))
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, args.heads, args.tokens, 64), np.float32),
             "kt": rng.standard_normal((1, args.heads, 64, args.tokens), np.float32),
             "v": rng.standard_normal((1, args.heads, args.tokens, 64), np.float32)}
    settings = {"mmap threshold 1 MiB (no heap kept)": lambda: sessions.return_freed_memory(1 << 20),
                "mmap threshold 32 MiB (heap kept)": lambda: sessions.return_freed_memory(32 << 20)}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, apply in settings.items():
            apply()
            session.run(None, feeds)   # the first run after a change settles the heap
            for _ in range(args.repeats):
                start = time.perf_counter()
                session.run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1e3)
    print("| glibc setting | median ms | min–max ms |\n|---|---|---|")
    for name, samples in times.items():
        print(f"| {name} | {statistics.median(samples):.1f} | {min(samples):.1f}–{max(samples):.1f} |")


if __name__ == "__main__":
    main()
