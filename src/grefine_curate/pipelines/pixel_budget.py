"""How many full-size decoded pixels a work unit holds at once (issue 15, memory).

Decoding runs on a thread pool ahead of the models. Each item takes the pixels it will hold (from
its header) from a ``PixelBudget`` before it is decoded and gives them back once the processor has dropped its
full-size image (after scoring; a refined item after its reduction to the refiner's input). Items
take their pixels in input order (a ticket each), so a later item never holds pixels an earlier
one waits for: the processor, which waits for items in input order, cannot deadlock. An item
larger than the whole budget is decoded alone.

The processor scores in chunks that fit the budget (``pixel_chunks``): a batch of usual-size images
is one chunk, as before; images near the pixel limit are scored a chunk at a time, so the full-size
images held at once stay within the budget.
"""

from __future__ import annotations

import threading
from typing import Sequence


# Images up to this size are the usual case (AIGI outputs are mostly 1024 x 1024 or smaller; maps
# and refinement work at this size): two batches of them always fit the budget, so such batches are
# never split and always decode ahead of the models, whatever the batch size.
WORKING_PIXELS = 1024 * 1024


def budget_pixels(max_pixels: int, batch_size: int) -> int:
    """The budget of a unit: two batches of images up to ``WORKING_PIXELS`` (or up to the pixel limit
    when that is lower), and at least two images at the pixel limit (one in the models, one decoding
    ahead; one with a batch size of 1). Larger images are bounded by the second term, not the first.
    ``max_pixels`` 0 means no limit (as ``decode_image`` reads it): two batches of usual images."""
    b = max(batch_size, 1)
    if max_pixels <= 0:
        return 2 * b * WORKING_PIXELS
    return max(max_pixels * min(b, 2), 2 * b * min(WORKING_PIXELS, max_pixels))


class PixelBudget:
    """A counting semaphore over pixels whose takers are served in ticket order."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a pixel budget needs a capacity of at least 1 pixel, got {capacity}")
        self.capacity = capacity
        self.held = 0
        self._next_ticket = 0  # the next ticket handed out
        self._serving = 0  # the ticket whose turn it is to take
        self._closed = False
        self._cond = threading.Condition()

    def ticket(self) -> int:
        """A place in line, taken in input order (by the thread that submits the decoding)."""
        with self._cond:
            t = self._next_ticket
            self._next_ticket += 1
            return t

    def take(self, ticket: int, pixels: int) -> bool:
        """Wait for the ticket's turn and room for ``pixels`` (or an empty budget); False once closed."""
        with self._cond:
            while not self._closed and not (
                ticket == self._serving and (self.held + pixels <= self.capacity or self.held == 0)
            ):
                self._cond.wait()
            if self._closed:
                return False
            self.held += pixels
            self._serving += 1
            self._cond.notify_all()
            return True

    def give(self, pixels: int) -> None:
        with self._cond:
            self.held = max(0, self.held - pixels)
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter (the unit is ending, e.g. on an error): ``take`` returns False."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def pixel_chunks(pixels: Sequence[int], capacity: int) -> list[list[int]]:
    """Consecutive index runs whose pixels fit ``capacity`` together (an item larger is alone)."""
    chunks: list[list[int]] = []
    total = 0
    for i, n in enumerate(pixels):
        if chunks and total + n <= capacity:
            chunks[-1].append(i)
            total += n
        else:
            chunks.append([i])
            total = n
    return chunks
