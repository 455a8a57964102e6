"""Preparing the next items of an iterator in a background thread ([`prefetch`][])."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# Tags of what the producer thread puts on the queue.
_ITEM, _END, _ERROR = range(3)


def prefetch(iterable: Iterable[T], size: int = 2) -> Iterator[T]:
    """The items of `iterable`, in order, drawn up to `size` items ahead in a background thread.

    Whatever producing an item costs (indexing, normalising, copying to the device: pass
    `map(prepare, batches)`) then overlaps with what the caller does with the previous items,
    e.g. a training step running on the device.

    **Arguments:**

    - `iterable`: any iterable; it is advanced from one (daemon) thread only.
    - `size`: how many items may wait, prepared, ahead of the caller; `0` draws each item
      when it is asked for, in the caller's thread (no thread).

    **Returns:** a generator of the same items in the same order. An exception raised while
    drawing an item is raised in the caller, at that item. Closing the generator (`close()`,
    or releasing it, e.g. after a `break`) stops the thread: it finishes the item it is
    drawing, drops the prepared ones and ends; then `iterable`'s own `close()` (a
    generator's) is called. Close it in a `finally` (or use `contextlib.closing`) so that an
    exception in the loop, such as `KeyboardInterrupt`, stops the thread too.
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"prefetch size={size!r} must be an int >= 0.")
    if size < 0:
        raise ValueError(f"prefetch size={size} must be >= 0 (0: no background thread).")
    try:
        it = iter(iterable)
    except TypeError:
        raise TypeError(f"prefetch needs an iterable, got {type(iterable).__name__}.") from None
    return _inline(it) if size == 0 else _threaded(it, size)


def _close(it: Iterator) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _inline(it: Iterator[T]) -> Iterator[T]:
    try:
        yield from it
    finally:
        _close(it)


def _threaded(it: Iterator[T], size: int) -> Iterator[T]:
    # Started at the first `next` (a generator's `finally` runs only once it has started).
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def produce():
        try:
            for item in it:
                items.put((_ITEM, item))
                if stop.is_set():
                    return
            items.put((_END, None))
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            items.put((_ERROR, e))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            tag, item = items.get()
            if tag == _END:
                return
            if tag == _ERROR:
                raise item
            yield item
    finally:
        stop.set()
        # Emptying the queue frees a producer blocked on a full queue: its one next `put`
        # then succeeds and it sees `stop`.
        while thread.is_alive():
            try:
                items.get(timeout=0.01)
            except queue.Empty:
                pass
        thread.join()
        _close(it)
