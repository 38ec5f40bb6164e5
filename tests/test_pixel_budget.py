"""PixelBudget: decoded pixels held at once, taken in input order (issue 15, memory)."""

from __future__ import annotations

import threading
import time

import pytest

from grefine_curate.pipelines.pixel_budget import PixelBudget, budget_pixels, pixel_chunks


def _taker(budget, ticket, pixels, log):
    def run():
        ok = budget.take(ticket, pixels)
        log.append((ticket, ok))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_takers_are_served_in_ticket_order_and_wait_for_room():
    budget = PixelBudget(10)
    t0, t1, t2 = budget.ticket(), budget.ticket(), budget.ticket()
    log: list = []
    third = _taker(budget, t2, 1, log)  # fits, but its turn has not come
    second = _taker(budget, t1, 6, log)
    time.sleep(0.1)
    assert log == []
    assert budget.take(t0, 6)
    time.sleep(0.1)
    assert log == [] and budget.held == 6  # 6 + 6 > 10: the second waits, the third behind it
    budget.give(6)
    second.join(2)
    third.join(2)
    assert log == [(t1, True), (t2, True)] and budget.held == 7


def test_an_item_larger_than_the_budget_is_taken_alone():
    budget = PixelBudget(10)
    t0, t1 = budget.ticket(), budget.ticket()
    assert budget.take(t0, 3)
    log: list = []
    big = _taker(budget, t1, 25, log)
    time.sleep(0.1)
    assert log == []
    budget.give(3)
    big.join(2)
    assert log == [(t1, True)] and budget.held == 25


def test_close_wakes_every_waiter():
    budget = PixelBudget(10)
    t0, t1 = budget.ticket(), budget.ticket()
    assert budget.take(t0, 10)
    log: list = []
    waiter = _taker(budget, t1, 5, log)
    time.sleep(0.05)
    budget.close()
    waiter.join(2)
    assert log == [(t1, False)]


def test_chunks_and_budget_size():
    assert pixel_chunks([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert pixel_chunks([1, 1, 1], 8) == [[0, 1, 2]]
    assert pixel_chunks([20, 1, 0, 30], 8) == [[0], [1, 2], [3]]
    assert pixel_chunks([], 8) == []
    mp64, mp1 = 8192 * 8192, 1024 * 1024
    assert budget_pixels(mp64, 8) == 2 * mp64  # two images at the limit
    assert budget_pixels(mp64, 1) == mp64  # batch size 1: one image at the limit
    assert budget_pixels(mp64, 256) == 2 * 256 * mp1  # two big batches of usual images are never split
    assert budget_pixels(100, 8) == 2 * 8 * 100  # a limit below the usual size: two batches at the limit
    assert budget_pixels(0, 8) == 2 * 8 * mp1  # 0: no limit (decode_image's reading), usual batches
    with pytest.raises(ValueError, match="at least 1 pixel"):
        PixelBudget(0)
