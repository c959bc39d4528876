"""The worker puts its long-lived objects out of the cyclic collector's sight, and still
frees the cycles of what it lets go later (a model version swapped out)."""

from __future__ import annotations

import gc
import weakref

import pytest

from stream_detector.worker import settle_heap

pytestmark = pytest.mark.unit


class Node:
    """An object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> Node:
    first, second = Node(), Node()
    first.other, second.other = second, first  # only the collector frees them
    return first


def test_settling_hides_what_is_kept_and_frees_cycles_dropped_before_it() -> None:
    try:
        kept, dropped = cycle(), cycle()
        gone = weakref.ref(dropped)
        del dropped
        settle_heap()
        assert gone() is None  # collected, not frozen
        assert not any(o is kept for o in gc.get_objects())  # out of the collector's walks
    finally:
        gc.unfreeze()


def test_a_frozen_cycle_let_go_later_is_freed_by_the_next_settling() -> None:
    try:
        model = cycle()  # loaded, then frozen with the rest
        settle_heap()
        swapped_out = weakref.ref(model)
        del model
        gc.collect()
        assert swapped_out() is not None  # frozen: no collection reaches it
        settle_heap()  # after the swap
        assert swapped_out() is None
    finally:
        gc.unfreeze()
