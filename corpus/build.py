"""Exports the corpus: each model built from a random-init config in torch, saved as ONNX, checked.

Nothing comes from a model hub: torchvision and transformers build the architectures from their
configs with random weights (seeded, so the corpus is the same on every machine with the pinned
versions). Every model is exported with the TorchScript exporter (``dynamo=False``: stable, and
it needs no onnxscript) at opset 17, with constant folding, then checked with
``onnx.checker.check_model`` on its path (the only form that follows external data) and run with
onnxruntime against torch's own output on the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from corpus import MANIFEST, Entry, feeds

OPSET = 17
EXTERNAL_DATA_ABOVE = 10 * 2**20  # weights above this go to a sibling .data file, as large models ship
REL_TOLERANCE = 1e-3              # max |onnxruntime - torch| over max |torch|, per output
SEQ = 128                         # BERT and GPT-2 sequence length
WHISPER_TOKENS = 64               # the fixed decoder length of the whisper-tiny-like model
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@dataclass(frozen=True)
class Input:
    name: str
    shape: tuple[int, ...]
    dtype: str
    feed: dict[str, Any] = field(default_factory=lambda: {"kind": "normal"})


@dataclass(frozen=True)
class Spec:
    """One torch-built corpus model: how to build it and what it takes and gives."""

    name: str
    family: str
    source: str
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]
    build: Callable[[], Any]  # () -> torch.nn.Module taking the inputs positionally


def _tokens(name: str, vocab: int, length: int = SEQ) -> Input:
    return Input(name, (1, length), "int64", {"kind": "integers", "low": 0, "high": vocab})


def _image(size: int, name: str = "input") -> Input:
    return Input(name, (1, 3, size, size), "float32", {"kind": "normal"})


def _hf(model: Any, keys: Sequence[str], outputs: Sequence[str], **fixed: Any) -> Any:
    """A transformers model as a module of positional tensors returning a tuple: the TorchScript
    exporter traces positional arguments and flat outputs, not keyword calls and ModelOutput."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(**dict(zip(keys, args, strict=True)), **fixed, return_dict=True)
            return tuple(out[k] for k in outputs)

    return Wrapped()


def _resnet50() -> Any:
    from torchvision.models import resnet50
    return resnet50(weights=None)


def _mobilenet() -> Any:
    from torchvision.models import mobilenet_v3_large
    return mobilenet_v3_large(weights=None)


def _yolo() -> Any:
    from corpus.nets import YoloStyle
    return YoloStyle()


def _unet() -> Any:
    from corpus.nets import UNet
    return UNet()


# Eager attention everywhere: the plain MatMul/Softmax graph every exporter and onnxruntime's
# transformer fusions know, rather than a traced scaled_dot_product_attention.
def _bert() -> Any:
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig(attn_implementation="eager"))
    return _hf(model, ("input_ids", "attention_mask", "token_type_ids"), ("last_hidden_state", "pooler_output"))


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(use_cache=False, attn_implementation="eager"))
    return _hf(model, ("input_ids",), ("logits",), use_cache=False)


WHISPER_TINY = {"vocab_size": 51865, "num_mel_bins": 80, "d_model": 384, "encoder_layers": 4,
                "decoder_layers": 4, "encoder_attention_heads": 6, "decoder_attention_heads": 6,
                "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536, "max_source_positions": 1500,
                "max_target_positions": 448}


def _whisper() -> Any:
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    config = WhisperConfig(**WHISPER_TINY, use_cache=False, attn_implementation="eager")
    return _hf(WhisperForConditionalGeneration(config), ("input_features", "decoder_input_ids"), ("logits",),
               use_cache=False)


SPECS: tuple[Spec, ...] = (
    Spec("resnet50", "cnn", "torchvision resnet50(weights=None)", (_image(224),), ("logits",), _resnet50),
    Spec("mobilenet_v3_large", "cnn", "torchvision mobilenet_v3_large(weights=None)", (_image(224),), ("logits",),
         _mobilenet),
    Spec("yolo_style", "detector", "corpus.nets.YoloStyle: YOLOv5s layout, boxes decoded, no NMS",
         (Input("images", (1, 3, 640, 640), "float32", {"kind": "uniform", "low": 0.0, "high": 1.0}),),
         ("detections",), _yolo),
    Spec("unet", "cnn", "corpus.nets.UNet: 4-level UNet, 64-1024 channels", (_image(256),), ("mask_logits",), _unet),
    Spec("bert_base", "transformer", f"transformers BertModel(BertConfig()), eager attention, seq {SEQ}",
         (_tokens("input_ids", 30522), Input("attention_mask", (1, SEQ), "int64", {"kind": "ones"}),
          Input("token_type_ids", (1, SEQ), "int64", {"kind": "zeros"})),
         ("last_hidden_state", "pooler_output"), _bert),
    Spec("gpt2_small", "transformer", f"transformers GPT2LMHeadModel(GPT2Config()), use_cache=False, seq {SEQ}",
         (_tokens("input_ids", 50257),), ("logits",), _gpt2),
    Spec("whisper_tiny", "encoder-decoder",
         f"transformers WhisperForConditionalGeneration, whisper-tiny sizes, {WHISPER_TOKENS} decoder tokens, no cache",
         (Input("input_features", (1, 80, 3000), "float32", {"kind": "normal"}),
          _tokens("decoder_input_ids", 51865, WHISPER_TOKENS)), ("logits",), _whisper),
)


@contextlib.contextmanager
def _traceable_masks() -> Iterator[None]:
    """transformers (4.5x) builds causal and padding masks with ``torch.vmap``, which the
    TorchScript tracer cannot follow (it fails with ``unordered_map::at``). For the export only,
    the mask functions are applied to broadcast index tensors instead: the same elementwise
    comparisons and lookups, so the same mask, as ordinary traceable ops. The check against
    torch's own (vmapped) output below confirms it."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return

    def broadcast(mask_function: Callable[..., Any], bh_indices: bool = True) -> Callable[..., Any]:
        def inner(b: Any, h: Any, q: Any, kv: Any) -> Any:
            if not bh_indices:  # the vmap-free [q, kv] form
                return mask_function(b, h, q[:, None], kv[None, :]).expand(len(q), len(kv))
            mask = mask_function(b[:, None, None, None], h[None, :, None, None], q[None, None, :, None],
                                 kv[None, None, None, :])
            return mask.expand(len(b), len(h), len(q), len(kv))
        return inner

    # TransformGetItemToIndex turns the mask functions' tensor indexing into an autograd.Function,
    # which the tracer cannot follow either; broadcast indices need no such help.
    # Packed-sequence detection (several sequences in one row, told apart by restarting position
    # ids) uses aten::diff, which has no ONNX export. The models compute their position ids as
    # one plain range, so it detects one sequence and its mask is all true: leaving it out is exact.
    names = ("_vmap_for_bhqkv", "TransformGetItemToIndex", "find_packed_sequence_indices")
    originals = [getattr(masking_utils, n) for n in names]
    for name, value in zip(names, (broadcast, contextlib.nullcontext, lambda position_ids: None), strict=True):
        setattr(masking_utils, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, originals, strict=True):
            setattr(masking_utils, name, value)


# -- describing a saved model ---------------------------------------------------------------------
def _tensor_bytes(dims: Sequence[int], elem_type: int) -> int:
    return int(np.prod(dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def weight_bytes(model: onnx.ModelProto) -> int:
    """Initializer bytes, plus what ConstantOfShape generates from a constant shape: the light
    models make their weights so at run time, and they occupy memory all the same."""
    initializers = {t.name: t for t in model.graph.initializer}
    total = sum(_tensor_bytes(t.dims, t.data_type) for t in initializers.values())
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in initializers:
            shape = onnx.numpy_helper.to_array(initializers[node.input[0]])
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            total += _tensor_bytes(shape.tolist(), value.data_type if value else onnx.TensorProto.FLOAT)
    return total


def _entry(name: str, family: str, source: str, path: Path, folder: Path, inputs: Sequence[Input]) -> Entry:
    model = onnx.load(path, load_external_data=False)
    data = path.with_name(path.name + ".data")
    return {
        "name": name, "path": path.relative_to(folder).as_posix(), "family": family, "source": source,
        "external_data": data.relative_to(folder).as_posix() if data.exists() else None,
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "nodes": len(model.graph.node), "weight_bytes": weight_bytes(model),
        "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype, "feed": i.feed} for i in inputs],
        "outputs": [o.name for o in model.graph.output],
    }


# -- exporting and checking -----------------------------------------------------------------------
def _save(model: onnx.ModelProto, path: Path) -> None:
    """Written beside ``path`` and renamed, so an interrupted build leaves no half model behind;
    onnx appends to an existing .data file, so the temporary folder also starts it empty."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        if weight_bytes(model) > EXTERNAL_DATA_ABOVE:
            onnx.save(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=path.name + ".data", size_threshold=1024)
            data = staged.with_name(path.name + ".data")
            data.chmod(0o644)  # onnx creates it private; the corpus is read by other processes and users
            data.replace(path.with_name(data.name))
        else:
            path.with_name(path.name + ".data").unlink(missing_ok=True)
            onnx.save(model, staged)
        staged.replace(path)


def export(spec: Spec, path: Path, dynamic_batch: bool) -> float:
    """Export ``spec`` to ``path``; returns the worst relative error of onnxruntime against torch."""
    import torch

    torch.manual_seed(0)  # per model, so a subset (--only) builds the same weights as the whole corpus
    module = spec.build().eval()
    names = [i.name for i in spec.inputs]
    entry = {"name": spec.name, "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype, "feed": i.feed}
                                           for i in spec.inputs]}
    batch = 2 if dynamic_batch else 1  # a symbolic batch is checked at a batch it was not traced at
    example = {k: torch.from_numpy(v) for k, v in feeds(entry, seed=0, batch=1).items()}
    check = feeds(entry, seed=1, batch=batch)
    axes = {n: {0: "batch"} for n in (*names, *spec.outputs)} if dynamic_batch else None
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        # The tracer warns about every Python branch on a shape; with static shapes they are exact.
        with _traceable_masks(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(example[n] for n in names), str(raw), dynamo=False, opset_version=OPSET,
                              do_constant_folding=True, input_names=names, output_names=list(spec.outputs),
                              dynamic_axes=axes)
        expected = module(*(torch.from_numpy(check[n]) for n in names))
        expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
        _save(onnx.load(raw), path)
    del module
    onnx.checker.check_model(str(path))  # the path form follows external data (and models > 2 GB)
    return _max_rel_error(path, check, expected)


def _max_rel_error(path: Path, inputs: dict[str, np.ndarray], expected: Sequence[np.ndarray]) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, inputs)
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape, f"{path.name}: onnxruntime gave {g.shape}, torch {e.shape}"
        # Relative to the output's scale: element-wise relative error is meaningless near zero.
        worst = max(worst, float(np.abs(g - e).max() / max(float(np.abs(e).max()), 1e-12)))
    return worst


def _light_entries(folder: Path) -> list[Entry]:
    """The real-architecture models the onnx package ships (weights generated at run time), copied
    in so the corpus folder is self-contained."""
    target = folder / "light"
    target.mkdir(exist_ok=True)
    entries = []
    for source in sorted(LIGHT.glob("light_*.onnx")):
        path = target / source.name
        if not path.exists():
            shutil.copyfile(source, path)
        model = onnx.load(path, load_external_data=False)
        weights = {t.name for t in model.graph.initializer}
        inputs = [Input(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim),
                        str(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)), {"kind": "ramp"})
                  for i in model.graph.input if i.name not in weights]
        entries.append(_entry(source.stem, "light", f"onnx {onnx.__version__} backend test data", path, folder,
                              inputs))
    return entries


# -- command line ---------------------------------------------------------------------------------
def _table(entries: Sequence[Entry], timing: dict[str, str]) -> str:
    rows = ["| model | family | nodes | weight MB | inputs | check | export s |", "|---|---|---:|---:|---|---|---:|"]
    for e in entries:
        inputs = ", ".join(f"{i['name']} {'x'.join(map(str, i['shape']))} {i['dtype']}" for i in e["inputs"])
        rel = e.get("check", {}).get("max_rel_error")
        check = "-" if rel is None else f"{rel:.1e} rel"
        rows.append(f"| {e['name']} | {e['family']} | {e['nodes']} | {e['weight_bytes'] / 1e6:.1f} | {inputs} | "
                    f"{check} | {timing.get(e['name'], '-' if e['family'] == 'light' else 'kept')} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("corpus/models"))
    parser.add_argument("--only", default="", help="comma-separated names (e.g. resnet50,bert_base); default all")
    parser.add_argument("--force", action="store_true", help="rebuild models already present")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="also export <name>_dynbatch variants with a symbolic batch dim")
    args = parser.parse_args(argv)
    folder: Path = args.out.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    old = {e["name"]: e for e in json.loads(manifest_path.read_text())["models"]} if manifest_path.exists() else {}

    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    variants = [(s, False) for s in SPECS] + ([(s, True) for s in SPECS] if args.dynamic_batch else [])
    known = {s.name for s in SPECS} | {f"{s.name}_dynbatch" for s in SPECS} | {"light"}
    if unknown := wanted - known:
        parser.error(f"unknown models {sorted(unknown)}; known: {sorted(known)}")

    entries: list[Entry] = []
    timing: dict[str, str] = {}
    failed: list[str] = []
    for spec, dynamic in variants:
        name = f"{spec.name}_dynbatch" if dynamic else spec.name
        path = folder / f"{name}.onnx"
        if wanted and name not in wanted and spec.name not in wanted:
            if name in old and path.exists():
                entries.append(old[name])  # outside this subset: keep what the manifest says
            continue
        inputs = tuple(Input(i.name, ("batch", *i.shape[1:]), i.dtype, i.feed) for i in spec.inputs) \
            if dynamic else spec.inputs
        check = old.get(name, {}).get("check")
        if args.force or not path.exists():
            print(f"exporting {name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                rel = export(spec, path, dynamic)
            except Exception as error:  # one failed export should not cost the rest of the corpus
                print(f"FAILED {name}: {type(error).__name__}: {error}", file=sys.stderr)
                failed.append(name)
                continue
            timing[name] = f"{time.perf_counter() - started:.0f}"
            check = {"max_rel_error": rel, "tolerance": REL_TOLERANCE, "passed": rel <= REL_TOLERANCE}
            if rel > REL_TOLERANCE:
                failed.append(name)
        entry = _entry(name, spec.family, spec.source, path, folder, inputs)
        entries.append({**entry, "check": check})
    if not wanted or "light" in wanted:
        entries += _light_entries(folder)
    else:
        entries += [e for e in old.values() if e["family"] == "light"]

    versions = {"onnx": onnx.__version__, "onnxruntime": ort.__version__}
    try:
        import torch
        import transformers
        versions |= {"torch": torch.__version__, "transformers": transformers.__version__}
    except ImportError:
        pass
    staged = manifest_path.with_suffix(".tmp")
    staged.write_text(json.dumps({"format": "hyperion.corpus", "version": 1, "opset": OPSET, "built_with": versions,
                                  "models": entries}, indent=1) + "\n")
    staged.replace(manifest_path)
    print(_table(entries, timing))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
