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
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


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
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).upper() if match else None
        if match and unit in _UNITS:
            size = int(float(match.group(1)) * _UNITS[unit])
            if size > 0:
                return size
        raise OptionError(
            f"{option}: cannot read {value!r} as a size; use bytes or a number with a unit "
            "such as '512KB', '256MB', '1.5GiB'")
    raise OptionError(f"{option}: expected bytes or a size like '256MB', got {type(value).__name__}")


def format_size(num_bytes: int | float) -> str:
    """A short human-readable size in binary units: '1.5 MiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
