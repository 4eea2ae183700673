"""The caching-allocator model (planner/model/allocator.py) on hand-worked cases, and its invariants on random
request sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_lab.planner.model.allocator import LARGE_PAGE, SMALL_PAGE, CachingAllocator, round_size

MB = 1 << 20


def test_requests_round_up_to_512_bytes():
    assert [round_size(n) for n in (1, 511, 512, 513, 3 * MB + 1)] == [512, 512, 512, 1024, 3 * MB + 512]


def test_the_segment_grows_in_20_mib_pages_and_reuses_its_free_tail():
    a = CachingAllocator()
    a.malloc("x", 30 * MB)
    assert a.reserved == 2 * LARGE_PAGE  # 30 MiB needs two pages; the 10 MiB left is a cached free block
    a.malloc("y", 10 * MB)  # fits the cached remainder exactly: no growth
    assert a.reserved == 2 * LARGE_PAGE
    a.free("y")
    a.malloc("z", 25 * MB)  # no cached block fits; the free 10 MiB tail is extended by one page
    assert a.reserved == 3 * LARGE_PAGE
    assert a.peak_allocated == 55 * MB


def test_best_fit_takes_the_smallest_cached_block_that_fits():
    a = CachingAllocator()
    for key, size in (("a", 40), ("sep1", 2), ("b", 30), ("sep2", 2), ("c", 60)):
        a.malloc(key, size * MB)
    before = a.reserved
    a.free("a")
    a.free("b")
    a.malloc("d", 25 * MB)  # 30 MiB block (b) rather than 40 MiB (a)
    pool, addr, given = a.live["d"]
    assert addr == a.live["sep1"][1] + 2 * MB and given == 25 * MB  # b's address; the 5 MiB rest split off
    assert a.reserved == before


def test_under_expandable_segments_any_remainder_of_512_bytes_is_split_off():
    """``should_split`` with expandable segments: ``remaining >= kMinBlockSize`` in both pools (without them the
    large pool would keep a remainder of up to 1 MiB inside the block)."""
    a = CachingAllocator()
    a.malloc("a", 20 * MB)
    a.malloc("sep", 2 * MB)
    a.free("a")
    a.malloc("b", 20 * MB - 512)
    assert a.live["b"][2] == 20 * MB - 512 and a.allocated == 22 * MB - 512
    a.malloc("c", 300)  # small pool
    assert a.live["c"][2] == 512


def test_the_growable_last_block_is_taken_only_when_no_other_cached_block_fits():
    """get_free_block counts the last mapped block as large as what it could grow into: a larger block elsewhere
    wins over it even where the last block would be the best fit."""
    a = CachingAllocator()
    a.malloc("a", 30 * MB)
    a.malloc("sep", 2 * MB)
    a.malloc("b", 8 * MB)  # the segment is 40 MiB mapped: 30 + 2 + 8
    a.free("a")  # 30 MiB free at the start; the last block (b) is in use
    a.free("b")  # now 8 MiB free at the end, growable
    a.malloc("c", 6 * MB)  # fits both; best fit would be the 8 MiB last block, but the 30 MiB one is taken
    assert a.live["c"][1] == 0
    a.malloc("d", 30 * MB)  # nothing else fits: the last block grows (8 MiB there, 22 more mapped in 2 pages)
    assert a.live["d"][1] == 32 * MB and a.reserved == 80 * MB


def test_freed_neighbours_merge_so_a_larger_request_fits_without_growing():
    a = CachingAllocator()
    for key in "abc":
        a.malloc(key, 20 * MB)
    a.malloc("sep", 2 * MB)
    before = a.reserved
    a.free("a")
    a.free("c")
    a.free("b")  # merges with both neighbours: one 60 MiB block
    a.malloc("big", 60 * MB)
    assert a.reserved == before


def test_a_hole_between_live_blocks_is_fragmentation():
    """Short-lived blocks freed between long-lived ones leave holes a larger request cannot use: the segment grows
    though fewer bytes are allocated than before."""
    a = CachingAllocator()
    for i in range(4):
        a.malloc(("short", i), 100 * MB)
        a.malloc(("long", i), 100 * MB)
    for i in range(4):
        a.free(("short", i))
    a.malloc("wide", 300 * MB)
    assert a.allocated == 700 * MB < a.peak_allocated == 800 * MB
    assert a.peak_reserved >= 1100 * MB  # 800 MiB mapped before, plus 300 MiB at the end


def test_small_requests_use_their_own_pool_of_2_mib_pages():
    a = CachingAllocator()
    a.malloc("s", 4096)
    a.malloc("l", 5 * MB)
    assert a.pools[0].mapped == SMALL_PAGE and a.pools[1].mapped == LARGE_PAGE
    assert a.reserved == SMALL_PAGE + LARGE_PAGE


requests = st.lists(st.tuples(st.booleans(), st.integers(1, 3 * LARGE_PAGE), st.integers(0, 40)), max_size=200)


@settings(max_examples=200, deadline=None)
@given(requests)
def test_blocks_tile_the_segment_and_bytes_add_up(ops):
    a = CachingAllocator()
    live: list[int] = []
    for key, (free, size, pick) in enumerate(ops):
        if free and live:
            a.free(live.pop(pick % len(live)))
        else:
            a.malloc(key, size)
            live.append(key)
        assert a.allocated == sum(a.live[k][2] for k in live)
        assert a.peak_reserved >= a.reserved >= a.allocated
        for pool in a.pools:
            addresses = sorted(pool.blocks)
            assert sum(pool.blocks.values()) == pool.mapped  # blocks tile the mapped range
            assert all(x + pool.blocks[x] == y for x, y in zip(addresses, addresses[1:]))
            free = {addr for _, addr in pool.free}
            assert not any(x in free and y in free for x, y in zip(addresses, addresses[1:]))  # merged
