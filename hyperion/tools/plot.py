"""Memory timeline of a schedule as a PNG (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path

from hyperion.errors import OptionError
from hyperion.files import write_atomic
from hyperion.schedule import Schedule


def plot_memory(schedule: Schedule, output: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("plot needs matplotlib: pip install 'hyperion[plot]'") from None
    mib = 1024 * 1024
    steps = [s.index for s in schedule.steps]
    live = [s.live_bytes / mib for s in schedule.steps]
    fig, ax = plt.subplots(figsize=(10, 4), dpi=120)
    ax.step(steps, live, where="mid", color="tab:blue", label="accounted live memory")
    ax.fill_between(steps, live, step="mid", alpha=0.25, color="tab:blue")
    if schedule.memory_limit:
        ax.axhline(schedule.memory_limit / mib, color="tab:red", linestyle="--", label="memory limit")
    ax.axhline(schedule.lower_bound_bytes / mib, color="tab:gray", linestyle=":", label="lower bound")
    for segment in schedule.segments[1:]:
        ax.axvline(segment.first_step - 0.5, color="black", alpha=0.2, linewidth=0.8)
    ax.set_xlabel(f"step ({len(schedule.segments)} segment(s), boundaries in grey)")
    ax.set_ylabel("MiB")
    ax.set_title(f"{Path(schedule.model.path or 'model').name}: {schedule.mode} mode, "
                 f"peak {schedule.peak_bytes / mib:.2f} MiB")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    output = Path(output)
    _save_atomic(fig, output)
    plt.close(fig)
    return output


def _save_atomic(fig, output: Path) -> None:
    """``fig`` written atomically, in the format its suffix names (an unknown one is an OptionError)."""
    fmt = output.suffix.lower().lstrip(".") or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise OptionError(f"{output}: cannot plot to a .{fmt} file; use .png, .svg or .pdf")
    write_atomic(output, lambda handle: fig.savefig(handle, format=fmt))
