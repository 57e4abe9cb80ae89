"""Peak resident set size of the running process: what the cap is checked against (SPEC).

Kept free of heavy imports, so a child process that measures itself pays nothing for it.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak RSS in bytes.

    Linux's ``VmHWM`` belongs to the process image, whereas ``ru_maxrss`` survives fork+exec
    and would report a larger parent's peak; ``ru_maxrss`` is the fallback elsewhere (bytes
    on macOS, KiB on other systems).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
