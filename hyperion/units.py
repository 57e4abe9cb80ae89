"""Parsing and printing of byte sizes ("256MB", "1.5GiB", 1048576)."""

from __future__ import annotations

import re

from hyperion.errors import OptionError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 2**10, "M": 2**20, "G": 2**30,
}
_SIZE_RE = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*([A-Za-z]*)\s*$")

#: The most bytes one tensor may need (declared dims, an external-data length, a size
#: option): 2**48, more than any machine addresses; anything above is refused before
#: it is sized or allocated.
MAX_TENSOR_BYTES = 1 << 48


def parse_size(value: int | str | None, option: str = "memory_limit") -> int | None:
    """Return ``value`` in bytes; ``None`` stays ``None`` (no cap).

    Decimal units (KB, MB, GB) are powers of 1000, binary ones (KiB, MiB, GiB)
    powers of 1024, as in the IEC convention.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise OptionError(f"{option}: expected bytes or a size like '256MB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise OptionError(f"{option}: must be positive, got {value}")
        if value > MAX_TENSOR_BYTES:
            raise OptionError(f"{option}: {value} bytes is more than Hyperion accepts ({MAX_TENSOR_BYTES})")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).upper() if match else None
        if match and unit in _UNITS:
            size = int(float(match.group(1)) * _UNITS[unit])
            if size > MAX_TENSOR_BYTES:
                raise OptionError(f"{option}: {_short(value)} is more than Hyperion accepts "
                                  f"({MAX_TENSOR_BYTES} bytes)")
            if size > 0:
                return size
        raise OptionError(
            f"{option}: cannot read {_short(value)} as a size; use bytes or a number with a unit "
            "such as '512KB', '256MB', '1.5GiB'")
    raise OptionError(f"{option}: expected bytes or a size like '256MB', got {type(value).__name__}")


def _short(value: str) -> str:
    """``value`` quoted, its middle left out when it is long."""
    return repr(value) if len(value) <= 40 else repr(f"{value[:18]}…{value[-18:]}")


def format_size(num_bytes: int | float) -> str:
    """A short human-readable size in binary units: '1.5 MiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
