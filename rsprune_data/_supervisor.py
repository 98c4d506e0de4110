"""Run work items in supervised worker processes: a dead worker costs its own item, nothing else.

A ``torch.utils.data.DataLoader`` ends the whole iteration when one of its workers dies (SIGKILL,
the kernel's OOM killer, a segfault in a codec), and the shards that worker still had are lost.
Here each worker process gets one item at a time over its own pipe; the parent waits on every pipe
and every process sentinel at once, so it sees a death as soon as it happens, reports the item that
worker held as failed (with the signal), starts a replacement and hands out the remaining items.

Shape of the data: ``items`` (ints) -> ``work(job, item)`` in a worker yields picklable messages ->
the parent iterates ``(item, message)`` pairs, plus one ``(item, Died(...))`` for an item whose
worker died before its last message. ``work`` must end every item with a message for which
``last(message)`` is true, and must not raise (convert errors to messages: exceptions may not
pickle).

Per-worker pipes, not one shared queue: a process killed while writing to a shared
``multiprocessing.Queue`` can leave its lock held and hang every other writer.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["Died", "supervised"]


@dataclass(frozen=True)
class Died:
    """The worker holding an item exited before finishing it."""

    exitcode: int | None

    def reason(self) -> str:
        code = self.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -code == 9 else ""
            return f"worker process killed by {name} (signal {-code}){hint}"
        return f"worker process exited with status {code} before finishing"


def _worker(work: Callable[[Any, int], Iterator[Any]], job: Any, conn: Connection) -> None:
    # Ctrl-C goes to the whole process group: the parent handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        torch.set_num_threads(1)  # as DataLoader workers do: N workers must not oversubscribe
    except ImportError:
        pass
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        for message in work(job, item):
            conn.send(message)


class _Eof:
    """The worker's end of the pipe is closed: it exited."""


def _receive(conn: Connection, *, everything: bool) -> Iterator[Any]:
    """One waiting message (``everything``: all of them, for a worker that exited)."""
    while conn.poll():
        try:
            yield conn.recv()
        except (EOFError, OSError):
            yield _Eof()
            return
        if not everything:
            return


@dataclass
class _Slot:
    proc: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    item: int | None = None


def supervised(
    work: Callable[[Any, int], Iterator[Any]],
    job: Any,
    items: Sequence[int],
    workers: int,
    last: Callable[[Any], bool],
) -> Iterator[tuple[int, Any]]:
    """Run ``work(job, item)`` for every item in ``workers`` supervised processes.

    Args:
        work: a module-level generator function (picklable under spawn/forkserver).
        job: its first argument, the same for every item (picklable).
        items: the work items, handed out in this order.
        workers: processes to run at once (>= 1).
        last: tells the final message of an item.

    Yields:
        ``(item, message)`` in the order messages arrive, and ``(item, Died(exitcode))`` for an
        item whose worker died before its final message.
    """
    ctx = multiprocessing.get_context()
    todo = deque(items)
    slots: list[_Slot] = []

    def start() -> None:
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_worker, args=(work, job, child), daemon=True)
        proc.start()
        child.close()  # only the worker holds it now: its death gives the parent EOF
        slots.append(_Slot(proc, parent))

    def feed(slot: _Slot) -> bool:
        """Hand the next item (or the stop signal) over; False when the worker is gone."""
        nxt = todo[0] if todo else None
        try:
            slot.conn.send(nxt)
        except OSError:  # it died after its last message: the item stays queued
            slot.item = None
            return False
        if nxt is not None:
            todo.popleft()
        slot.item = nxt
        return True

    try:
        for _ in range(min(workers, len(todo))):
            start()
            feed(slots[-1])
        while any(s.item is not None for s in slots):
            busy = [s for s in slots if s.item is not None]
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy])
            for slot in busy:
                exited = slot.proc.sentinel in ready
                if slot.conn not in ready and not exited:
                    continue
                # one message per live worker per round (fair); a dead one is drained completely:
                # everything it sent before it died counts
                for message in _receive(slot.conn, everything=exited):
                    if isinstance(message, _Eof) or slot.item is None:
                        exited = True
                        break
                    yield slot.item, message
                    if last(message):
                        if exited:
                            slot.item = None
                        elif not feed(slot):
                            exited = True
                        break
                if not exited:
                    continue
                slot.proc.join()
                if slot.item is not None:
                    yield slot.item, Died(slot.proc.exitcode)
                slot.conn.close()
                slots.remove(slot)
                if todo:
                    start()
                    feed(slots[-1])
    finally:
        for slot in slots:
            with contextlib.suppress(OSError):
                slot.conn.close()
            if slot.proc.is_alive():
                slot.proc.terminate()
        for slot in slots:
            slot.proc.join(5)
            if slot.proc.is_alive():  # ignored SIGTERM: it must not outlive the run
                os.kill(slot.proc.pid, signal.SIGKILL)
                slot.proc.join()
