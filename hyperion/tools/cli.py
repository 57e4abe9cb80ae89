"""The ``hyperion`` command line.

Errors print one line and exit with their class's code (docs/errors.md): 2 for usage
errors, ``HyperionError.exit_code`` for the others, 70 for an internal error (a bug);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hyperion.errors import FeedError, HyperionError, OptionError, OutputError
from hyperion.files import refuse_overwrite, write_atomic
from hyperion.units import format_size, parse_size

if TYPE_CHECKING:
    from hyperion.tools.bench import OrtFraction

EXIT_USAGE = 2          # argparse's status for a bad command line; OptionError's too
EXIT_ERROR = EXIT_USAGE  # kept for callers of the former single error status
EXIT_MISMATCH = 1
EXIT_INTERNAL = 70      # an exception that is not a HyperionError: a bug (BSD's EX_SOFTWARE)
EXIT_INTERRUPTED = 130
MODES = ("normal", "memory_opt", "streaming", "adaptive")
# What plot -o writes: an interactive page (plotly), or a format matplotlib writes; checked
# before anything is drawn.
PLOT_FORMATS = ("png", "html", "htm", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp", "pgf",
                "raw", "rgba")


# -- argument helpers ------------------------------------------------------------------
def _shape_arg(text: str) -> tuple[str, list[int]]:
    name, _, dims = text.rpartition("=")
    if not name or not re.fullmatch(r"\d+(x\d+)*", dims):
        raise argparse.ArgumentTypeError(f"--input-shape: expected NAME=1x3x224x224, got {text!r}")
    return name, [int(d) for d in dims.split("x")]


def _input_arg(text: str) -> tuple[str, Path]:
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--input: expected NAME=FILE.npy, got {text!r}")
    return name, Path(path)


def _count_arg(minimum: int, option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{option}: expected an integer of at least {minimum}, got {text!r}")
        return value

    return parse


def _plot_arg(text: str) -> Path:
    suffix = Path(text).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(f"-o: cannot plot to {text!r}: name a file ending in one of "
                                         f"{', '.join('.' + f for f in PLOT_FORMATS[:8])}, ...")
    return Path(text)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text, "--memory-limit") or 0
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bench_limit_arg(text: str) -> int | OrtFraction:
    from hyperion.tools.bench import parse_limit

    try:
        return parse_limit(text)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-limit", type=_size_arg, metavar="SIZE", help="cap, e.g. 256MB or 1.5GiB")
    parser.add_argument("--mode", choices=MODES, default="adaptive")
    parser.add_argument("--input-shape", type=_shape_arg, action="append", default=[], metavar="NAME=DIMS",
                        help="bind an input's shape, e.g. input_ids=1x128 (repeatable)")


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (they show on a terminal only, never in a pipe or file)")


def _step_arg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"--at: expected a step number, got {text!r}")
    return int(text)


def _add_no_prepack(parser: argparse.ArgumentParser) -> None:
    packing = parser.add_mutually_exclusive_group()
    packing.add_argument("--prepack", dest="prepack", action="store_const", const=True, default=None,
                         help="pre-pack weights in every session, as plain onnxruntime does (exact; under a cap, "
                              "streamed sessions are rebuilt every run). Default: packed in normal mode only")
    packing.add_argument("--no-prepack", dest="prepack", action="store_const", const=False,
                         help="never pre-pack: weights fed unpacked from their file to sessions built once, "
                              "in every mode")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperion", description="Compile ONNX models into explicit "
                                     "schedules and run them under a memory cap.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("compile", help="compile a model and save its schedule")
    p.add_argument("model", type=Path)
    _add_plan_options(p)
    p.add_argument("-o", "--output", type=Path, help="schedule file (default: MODEL.schedule.json here)")
    p.add_argument("--smallest-limit", action="store_true",
                   help="print the smallest memory limit a plan in --mode fits, and save no schedule")
    _add_quiet(p)

    p = commands.add_parser("run", help="run a model, optionally checking against plain onnxruntime")
    p.add_argument("model", type=Path)
    p.add_argument("--schedule", type=Path, help="a schedule saved by 'hyperion compile'")
    _add_plan_options(p)
    p.add_argument("--input", type=_input_arg, action="append", default=[], metavar="NAME=FILE.npy")
    p.add_argument("--output-dir", type=Path, help="write each output as NAME.npy here")
    p.add_argument("--check", action="store_true", help="compare the outputs with plain onnxruntime")
    p.add_argument("--seed", type=_count_arg(0, "--seed"),
                   help="seed for generated inputs (printed when chosen at random)")
    p.add_argument("--trace", type=Path, metavar="RUN.json",
                   help="write a measured Chrome/Perfetto trace of the run (open it in ui.perfetto.dev)")
    _add_no_prepack(p)
    _add_quiet(p)
    _add_ray_options(p)

    p = commands.add_parser("inspect", help="show layers, edge kinds, liveness and memory per step")
    p.add_argument("target", type=Path, help="a model or a schedule file")
    _add_plan_options(p)
    p.add_argument("--json", action="store_true", help="every figure as JSON, with a summary")
    p.add_argument("--at", type=_step_arg, metavar="STEP", help="the tensors resident at STEP, sizes and roles")

    p = commands.add_parser("plot", help="plot a schedule's memory timeline")
    p.add_argument("schedule", type=Path)
    p.add_argument("-o", "--output", type=_plot_arg, default=Path("memory.png"),
                   help="an image (.png, .svg, .pdf) or an interactive page (.html, needs plotly)")
    p.add_argument("--trace", type=Path, metavar="RUN.json",
                   help="a trace from 'hyperion run --trace': draw the measured RSS over the plan")

    p = commands.add_parser("export", help="export a schedule as Graphviz dot or a Chrome trace")
    p.add_argument("schedule", type=Path)
    p.add_argument("--format", choices=("dot", "trace"), required=True,
                   help="dot: Graphviz (dot -Tsvg); trace: the planned, unmeasured timeline (run --trace measures)")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")

    p = commands.add_parser("bench", help="latency and memory side by side with plain onnxruntime")
    p.add_argument("model", type=Path)
    p.add_argument("--memory-limit", type=_bench_limit_arg, action="append", default=[], metavar="SIZE|PERCENT",
                   help="also measure under this cap (repeatable): a size, or a percentage such as 50%% of plain "
                        "onnxruntime's peak RSS on the model (measured first); no cap is always measured")
    p.add_argument("--mode", choices=MODES, default="adaptive")
    p.add_argument("--input-shape", type=_shape_arg, action="append", default=[], metavar="NAME=DIMS")
    p.add_argument("--repeats", type=_count_arg(1, "--repeats"), default=20)
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    _add_no_prepack(p)
    _add_quiet(p)

    p = commands.add_parser("demo", help="the bundled demo model, end to end")
    p.add_argument("--model", type=Path, help="use another model instead of the bundled one")
    p.add_argument("--output-dir", type=Path, default=Path("hyperion-demo"))
    return parser


# -- commands -------------------------------------------------------------------------------
def _compile(args: argparse.Namespace, model: Path):
    import hyperion

    return hyperion.compile(model, memory_limit=args.memory_limit, mode=args.mode,
                            input_shapes=dict(args.input_shape) or None,
                            prepack_weights=getattr(args, "prepack", None))


def cmd_compile(args: argparse.Namespace) -> int:
    from hyperion.tools.report import summary

    if args.smallest_limit:
        return _print_smallest_limit(args)
    with _working(f"compiling {args.model.name}", args.quiet):
        cm = _compile(args, args.model)
    output = args.output or Path(f"{args.model.stem}.schedule.json")
    refuse_overwrite(output, _given_files(args), option="-o")
    cm.schedule.save(output)
    print(summary(cm.schedule))
    print(f"schedule     {output}")
    return 0


def _print_smallest_limit(args: argparse.Namespace) -> int:
    """The smallest cap: what compile names when refusing a cap of one byte."""
    import hyperion

    with _working(f"compiling {args.model.name}", args.quiet):
        try:
            hyperion.compile(args.model, memory_limit=1, mode=args.mode,
                             input_shapes=dict(args.input_shape) or None)
        except hyperion.MemoryLimitError as refusal:
            smallest, node = refusal.smallest_limit_bytes, refusal.node
        else:
            smallest, node = 1, None
    print(f"smallest limit {smallest} bytes ({format_size(smallest)}) in {args.mode} mode"
          + (f", set by node {node!r}" if node else ""))
    return 0


def _load_inputs(cm, args: argparse.Namespace) -> dict[str, np.ndarray]:
    from hyperion.tools.feeds import input_shapes_of, random_feeds

    given: dict[str, np.ndarray] = {}
    for name, path in args.input:
        if name not in cm.input_names:
            raise FeedError(f"--input {name}: the model has no input {name!r}; inputs are {list(cm.input_names)}")
        try:
            given[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FeedError(f"--input {name}: cannot read {path}: {exc}") from None
    missing = [n for n in cm.input_names if n not in given]
    if missing:
        seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
        declared = cm.base_ir if cm.imported else cm.schedule  # a loaded schedule needs no import
        shapes = input_shapes_of(declared, {**dict(args.input_shape), **{k: v.shape for k, v in given.items()}})
        generated = random_feeds(declared, shapes, seed)
        print(f"generated random input(s) {', '.join(missing)} with --seed {seed}")
        given.update((n, generated[n]) for n in missing)
    return given


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pipeline stages on Ray (pip install 'hyperion[ray]'; docs/cluster.md)")
    group.add_argument("--ray", action="store_true",
                       help="run as pipeline stages, one Ray actor each (cluster at $RAY_ADDRESS, else a local one)")
    group.add_argument("--stages", type=_count_arg(1, "--stages"), default=2, help="pipeline stages (default 2)")
    group.add_argument("--memory-limit-per-stage", type=_size_arg, metavar="SIZE", help="each stage's cap")
    group.add_argument("--micro-batches", type=_count_arg(1, "--micro-batches"), default=1,
                       help="parts the batch is split into, streamed through the stages (default 1)")


def _run_on_ray(args: argparse.Namespace) -> int:
    """``run --ray``: the model partitioned into stages run by Ray actors, each under its cap."""
    import hyperion
    from hyperion.ray import RayPipeline

    if args.schedule or args.trace or args.memory_limit is not None:
        raise OptionError("--ray: use --memory-limit-per-stage (each stage compiles its own schedule); "
                          "--schedule, --trace and --memory-limit do not apply")
    feeds = _load_inputs(hyperion.compile(args.model, input_shapes=dict(args.input_shape) or None), args)
    import ray

    started = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    try:
        with RayPipeline(args.model, args.stages, args.memory_limit_per_stage, args.micro_batches) as pipeline:
            outputs = pipeline.run(feeds)
            assert pipeline.plan is not None
            packed = all(stage.schedule.packed_kernels for stage in pipeline.plan.stages)
            for stage, mode, rss in zip(pipeline.plan.stages, pipeline.stage_modes(),
                                        pipeline.stage_peak_rss_bytes(), strict=True):
                print(f"stage {stage.index}: steps {stage.first_step}-{stage.last_step}, weights "
                      f"{format_size(stage.weight_bytes)}, mode {mode}, peak RSS {format_size(rss)} above baseline")
    finally:
        if started:
            ray.shutdown()
    for name, value in outputs.items():
        print(f"  {name}: {value.dtype}{list(value.shape)}")
    if args.output_dir:
        for name, value in outputs.items():
            target = args.output_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.npy"
            refuse_overwrite(target, _given_files(args), option="--output-dir")
            write_atomic(target, lambda handle, value=value: np.save(handle, value, allow_pickle=False))
    if args.check:
        return _check_against_onnxruntime(args.model, feeds, outputs, prepack_weights=packed)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import hyperion

    if args.ray:
        return _run_on_ray(args)
    if args.schedule:
        cm = hyperion.load(args.model, args.schedule, prepack_weights=args.prepack is not False)
    else:
        cm = _compile(args, args.model)
    feeds = _load_inputs(cm, args)
    with _progress_bar(f"running {args.model.name}", args.quiet) as progress:
        outputs = cm.run(feeds, progress, trace=args.trace)
    stats = cm.stats
    print(f"ran {len(cm.schedule.steps)} steps in {len(cm.schedule.segments)} segment(s), mode {stats.mode}, "
          f"{stats.total_ms:.1f} ms, accounted peak {format_size(stats.peak_bytes)}")
    for name, value in outputs.items():
        print(f"  {name}: {value.dtype}{list(value.shape)}")
    if args.output_dir:
        for name, value in outputs.items():
            target = args.output_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.npy"
            refuse_overwrite(target, _given_files(args, cm.schedule), option="--output-dir")
            write_atomic(target, lambda handle, value=value: np.save(handle, value, allow_pickle=False))
        print(f"outputs written to {args.output_dir}")
    if args.trace:
        print(f"trace written to {args.trace} (open it in ui.perfetto.dev or chrome://tracing)")
    if args.check:
        # Against onnxruntime with the same GEMM kernels: packed or not, as the schedule ran.
        return _check_against_onnxruntime(args.model, feeds, outputs, prepack_weights=cm.schedule.packed_kernels)
    return 0


def _show_progress(quiet: bool = False) -> bool:
    """Progress bars go to standard error, and only when it is a terminal and not --quiet."""
    return not quiet and sys.stderr.isatty()


def _screen() -> dict[str, int]:
    """The terminal's size for tqdm; one that reports none (a fresh pseudo-terminal says 0x0,
    and tqdm would then draw nothing) counts as $COLUMNS x $LINES or 80 x 24."""
    import shutil

    size = shutil.get_terminal_size()
    return {"ncols": size.columns, "nrows": size.lines}


@contextlib.contextmanager
def _progress_bar(label: str, quiet: bool = False, unit: str = "segment"
                  ) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar (done, total), on a terminal only (tqdm)."""
    if not _show_progress(quiet):
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc=label, unit=unit, leave=False, file=sys.stderr, mininterval=0.2, **_screen()) as bar:
        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


@contextlib.contextmanager
def _working(label: str, quiet: bool = False, delay: float = 1.0) -> Iterator[None]:
    """A spinner with the elapsed time for work without steps to count (compiling), on a
    terminal only, and only once it has lasted ``delay`` seconds."""
    if not _show_progress(quiet):
        yield
        return
    import threading

    from tqdm import tqdm

    done = threading.Event()

    def show() -> None:  # nothing is drawn before ``delay``; the line is cleared at the end
        if done.wait(delay):
            return
        with tqdm(desc=label, total=None, bar_format="{desc}: {elapsed}", leave=False, file=sys.stderr,
                  **_screen()) as bar:
            while not done.wait(0.2):
                bar.refresh()

    ticker = threading.Thread(target=show, name="hyperion-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def _check_against_onnxruntime(model: Path, feeds, outputs, prepack_weights: bool) -> int:
    from hyperion.tools.bench import ort_session

    session = ort_session(model, prepack_weights)
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feeds), strict=True))
    worst, ok = 0.0, True
    for name, want in expected.items():
        got = np.asarray(outputs[name])
        if got.shape != want.shape or got.dtype != want.dtype:
            ok = False
        elif np.issubdtype(want.dtype, np.floating) or np.issubdtype(want.dtype, np.complexfloating):
            # NaN where onnxruntime has NaN (and inf where it has the same inf) is a match. The
            # absolute tolerance follows the output's scale: a segmented or fed run sums in another
            # order than onnxruntime (docs/memory.md), which moves values near zero by rounding
            # errors of the whole output's size.
            finite = np.isfinite(got) & np.isfinite(want)
            scale = float(np.max(np.abs(want[finite]), initial=0.0))
            ok &= bool(np.allclose(got, want, rtol=1e-5, atol=max(1e-6, 1e-5 * scale), equal_nan=True))
            worst = max(worst, float(np.max(np.abs(got[finite] - want[finite]), initial=0.0)))
        else:
            ok &= bool(np.array_equal(got, want))
    print(f"check: {'outputs match' if ok else 'MISMATCH against'} plain onnxruntime "
          f"(max abs difference {worst:.3g})")
    return 0 if ok else EXIT_MISMATCH


def cmd_inspect(args: argparse.Namespace) -> int:
    from hyperion.schedule import Schedule
    from hyperion.tools.report import alive_data, alive_table, inspect_data, step_table, summary

    if args.target.suffix == ".json":
        schedule = Schedule.load(args.target)
    else:
        schedule = _compile(args, args.target).schedule
    if args.at is not None and not args.at < len(schedule.steps):
        raise OptionError(f"--at {args.at}: the schedule has steps 0-{len(schedule.steps) - 1}")
    if args.json:
        data = alive_data(schedule, args.at) if args.at is not None else inspect_data(schedule)
        _write_stdout(json.dumps(data, indent=1) + "\n")
    elif args.at is not None:
        _write_stdout(alive_table(schedule, args.at) + "\n")
    else:
        _write_stdout(f"{summary(schedule)}\n\n{step_table(schedule)}\n")
    return 0


def _write_stdout(text: str) -> None:
    """Write to standard output; a reader that stops early (``| head``) is not an error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit then writes nowhere


def cmd_plot(args: argparse.Namespace) -> int:
    from hyperion.schedule import Schedule
    from hyperion.tools.plot import plot_memory

    refuse_overwrite(args.output, _given_files(args), option="-o")
    written = plot_memory(Schedule.load(args.schedule), args.output, trace=args.trace)
    print(f"memory timeline written to {written}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hyperion.schedule import Schedule
    from hyperion.tools.report import to_dot, to_trace

    schedule = Schedule.load(args.schedule)
    text = to_dot(schedule) if args.format == "dot" else to_trace(schedule)
    if args.output:
        refuse_overwrite(args.output, _given_files(args), option="-o")
        write_atomic(args.output, text)
        print(f"{args.format} written to {args.output}")
    else:
        _write_stdout(text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from hyperion.tools.bench import bench_model, markdown_table

    limits = [None, *args.memory_limit]
    with _progress_bar(f"bench {args.model.name}", args.quiet, unit="measurement") as progress:
        rows = bench_model(args.model, limits, mode=args.mode, input_shapes=dict(args.input_shape) or None,
                           repeats=args.repeats, measure_rss=not args.no_rss, prepack_weights=args.prepack,
                           progress=progress)
    print(markdown_table(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hyperion.tools.demo import run_demo

    return run_demo(args.model, args.output_dir)


def _given_files(args: argparse.Namespace, schedule=None) -> list[tuple[str, Path | str | None]]:
    """What the user gave a command, which nothing it writes may replace: the model, the
    schedule read, the input arrays, and the model's external data (from ``schedule``)."""
    given: list[tuple[str, Path | str | None]] = [
        ("the model", getattr(args, "model", None)), ("the schedule being read", getattr(args, "schedule", None)),
        ("the trace being read", getattr(args, "trace", None) if getattr(args, "command", None) == "plot" else None),
        *((f"input {name!r}", path) for name, path in getattr(args, "input", []))]
    if schedule is not None:
        given += [(f"the external data of weight {t.name!r}", t.external.path)
                  for t in schedule.tensors.values() if t.external is not None]
    return given


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "inspect": cmd_inspect, "plot": cmd_plot,
            "export": cmd_export, "bench": cmd_bench, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (argparse exits 2 itself on a usage error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("hyperion: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        return _report(exc)


def _report(exc: Exception) -> int:
    """Print ``exc`` as one line; the exit status of its class."""
    if isinstance(exc, HyperionError):
        message, code = str(exc), exc.exit_code
    elif isinstance(exc, OSError):  # a file the user named could not be read or written
        message, code = str(exc), OutputError.exit_code
    else:
        message = (f"internal error ({type(exc).__name__}: {exc}); this is a bug in Hyperion: please report it "
                   "with the output of the same command with --debug")
        code = EXIT_INTERNAL
    print(f"hyperion: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
