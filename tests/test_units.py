from __future__ import annotations

import pytest

from hyperion.units import format_size, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("512KB", 512_000), ("256MB", 256_000_000), ("1.5GiB", 1_610_612_736), ("100MiB", 104_857_600),
    ("4096", 4096), (" 2 kib ", 2048), ("1M", 1_048_576), (12345, 12345), (None, None),
])
def test_parse_size(text: object, expected: int | None) -> None:
    assert parse_size(text) == expected  # type: ignore[arg-type]


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 2**30) == "3.0 GiB"
