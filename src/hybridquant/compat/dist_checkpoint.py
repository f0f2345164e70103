"""Synchronous megatron-core checkpoint saves without a helper process.

megatron-core's ``torch_dist`` strategy writes through ``FileSystemWriterAsync`` also when the save is
synchronous (``dist_checkpointing.save`` without ``async_sharded_save``): the writer threads run in
the calling process and hand their results back through ``get_write_results_queue()``, a queue held by
a ``multiprocessing`` Manager started with the ``spawn`` context. That Manager is a server process which
re-imports the entry point (torch, Hydra, the stage: ~4 CPU-seconds and as many seconds of wall time
per saving rank) only to pass one dict back to the process that put it there.

``in_process_write_results()`` makes that queue a plain ``queue.Queue`` for the duration of a
synchronous save. An asynchronous save (writing in another process) would need the Manager; nothing
here saves asynchronously.
"""

from __future__ import annotations

import contextlib
import queue


@contextlib.contextmanager
def in_process_write_results():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async.get_write_results_queue

    def local_queue(mp_mode: str = "spawn") -> queue.Queue:
        return queue.Queue()

    filesystem_async.get_write_results_queue = local_queue
    try:
        yield
    finally:
        filesystem_async.get_write_results_queue = original
