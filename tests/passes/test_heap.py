"""memory.heap: the footprint of the C heap a plan's runs keep (rule 14 of segment), on a model
of glibc's heap: blocks reused best-fit, holes no larger block fits, the runtime's trims."""

from __future__ import annotations

from hyperion.passes.memory.heap import Alloc, Free, Trim, heap_footprint

MIB = 2**20


def block(nbytes: int) -> int:
    """A block's size in the model: 64-byte aligned, with its chunk header."""
    return -(-nbytes // 64) * 64 + 64


def test_a_block_freed_is_reused_by_the_next_run_and_the_heap_does_not_grow() -> None:
    run = [Alloc("a", MIB), Alloc("b", MIB), Free("a"), Free("b"), Trim()]
    assert heap_footprint(run, kept_bytes=2 * MIB, runs=1) == 2 * block(MIB)
    assert heap_footprint(run, kept_bytes=2 * MIB, runs=3) == 2 * block(MIB)


def test_ever_wider_blocks_leave_holes_no_later_block_fits() -> None:
    # DenseNet's concatenations: each output is wider than every block freed before it.
    sizes = [MIB * k for k in range(1, 6)]
    run: list[Alloc | Free | Trim] = [Alloc("c0", sizes[0])]
    for k in range(1, len(sizes)):
        run += [Alloc(f"c{k}", sizes[k]), Free(f"c{k - 1}")]
    run += [Free(f"c{len(sizes) - 1}"), Trim()]
    live_high_water = block(sizes[-2]) + block(sizes[-1])
    footprint = heap_footprint(run, kept_bytes=100 * MIB, runs=1)
    assert footprint == sum(block(s) for s in sizes) > live_high_water


def test_the_runtime_trim_between_segments_gives_a_holes_pages_back() -> None:
    # A 4 MiB block freed below a small one that outlives it leaves a hole; the next segment
    # carves 3 MiB out of it and takes 3 MiB more from the top. Untrimmed, the hole's last
    # MiB stays resident beside them.
    run = [Alloc("a", 4 * MIB), Alloc("pin", 1024), Free("a"), Trim(),
           Alloc("b", 3 * MIB), Alloc("c", 3 * MIB), Free("b"), Free("c"), Free("pin"), Trim()]
    untrimmed = heap_footprint(run, kept_bytes=8 * MIB, runs=1)
    trimmed = heap_footprint(run, kept_bytes=0, runs=1)
    assert untrimmed == 2 * block(3 * MIB) + block(1024) + MIB
    assert trimmed == untrimmed - MIB


def test_a_block_of_32_mib_or_more_is_mapped_alone_and_the_top_keeps_what_was_freed() -> None:
    # The big block is mapped on its own and returned when freed: the small one comes from
    # the heap's top, whose freed pages stay (glibc trims the top itself beyond 64 MiB only,
    # and the runtime's trim when more than the kept bytes lie free below it). So the second
    # run's big block counts beside the first run's small pages, once each.
    run = [Alloc("big", 40 * MIB), Free("big"), Alloc("small", MIB), Free("small"), Trim()]
    assert heap_footprint(run, kept_bytes=0, runs=1) == block(40 * MIB)
    assert heap_footprint(run, kept_bytes=0, runs=2) == block(40 * MIB) + block(MIB)
    assert heap_footprint(run, kept_bytes=0, runs=3) == block(40 * MIB) + block(MIB)
