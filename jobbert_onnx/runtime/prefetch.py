"""Run a producer one step ahead in a thread, so CPU work overlaps the device's.

onnxruntime releases the GIL while a graph runs, so tokenizing and padding the
next batches in a thread proceeds while the GPU works on the current one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield from `items`, produced up to `depth` items ahead in a background thread.

    An exception in the producer is raised in the consumer at the point it would
    have occurred. If the consumer stops early, the producer stops too.
    """
    slots: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
        except BaseException as error:  # handed to the consumer, re-raised there
            offer(_Failure(error))
            return
        offer(_DONE)

    worker = threading.Thread(target=produce, name="jobbert-onnx-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error
