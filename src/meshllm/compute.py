"""The one thread of a process on which every engine computation runs: steps, loads, calibrations.

The CPU kernels of ggml and of PyTorch run their parallel work on OpenMP, and GNU libgomp keeps a team of
threads for every thread that ever started a parallel region; a team's idle threads stay for the life of
the thread that made it. Once a process holds more such threads than the machine has cores, libgomp stops
spinning at its barriers and sleeps in the kernel instead, and a decode step passes hundreds of barriers
(ggml: a few per graph node). Measured on a 2-core machine, a Qwen3-0.6B-shaped q8_0 ggml stage served
13 tokens/s where the same stage alone decodes 19, because its calibration had run on another thread than
its steps. So a process computes on this one thread only; the others hand their work to it.

Handing work over wakes the thread, and on a 2-core machine a sleeping thread took 0.1–0.2 ms to wake
and get going. So the thread also waits on sockets given to `watch`: a worker's step links are read by
the compute thread itself, and a step that arrives is computed with no other thread woken on the way.
Between two pieces of work the thread looks at its sockets without waiting, so a long queue of work does
not starve them.

An engine whose library keeps state per thread (MLX's streams) registers its clean-up with `at_exit`: it
runs on the compute thread when the interpreter finishes, before that thread ends. MLX 0.32 otherwise
aborts the process at exit now and then ("terminate called without an active exception") when the
thread that made its streams ends before them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import selectors
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: ComputeThread | None = None
_at_exit: list[Callable[[], object]] = []


class ComputeThread(Executor):
    """One thread running submitted work in order and, between pieces of it, the readers of the sockets
    it watches. An `Executor`, so an event loop's `run_in_executor` takes it."""

    def __init__(self, name: str = "compute"):
        self._work: collections.deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._sleeping = False  # waiting on its sockets with no timeout: new work must wake it
        self._closed = False
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        call = fn if not kwargs else (lambda *a: fn(*a, **kwargs))
        with self._lock:
            if self._closed:
                raise RuntimeError("the compute thread has ended")
            self._work.append((future, call, args))
            wake, self._sleeping = self._sleeping, False
        if wake:
            self._wake()
        return future

    def watch(self, sock: socket.socket, reader: Callable[[], object]) -> None:
        """Call `reader()` on this thread whenever `sock` has bytes to read (or was closed), until
        `unwatch`. Only this thread touches its selector: called elsewhere, it is queued."""
        self.run(self._register, sock, reader)

    def unwatch(self, sock: socket.socket) -> None:
        self.run(self._unregister, sock)

    def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` on this thread; the caller waits. Called here, it runs at once."""
        if threading.current_thread() is self.thread:
            return function(*args)
        return self.submit(function, *args).result()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                for future, _, _ in self._work:
                    future.cancel()
        self._wake()
        if wait and threading.current_thread() is not self.thread:
            self.thread.join()

    def _register(self, sock: socket.socket, reader: Callable[[], object]) -> None:
        fd = sock.fileno()
        stale = self._selector.get_map().get(fd)
        if stale is not None:  # a socket closed while watched: epoll forgot it, the map did not
            self._selector.unregister(stale.fileobj)
        self._selector.register(fd, selectors.EVENT_READ, reader)

    def _unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd >= 0 and fd in self._selector.get_map():
            self._selector.unregister(fd)

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"\0")
        except OSError:  # its buffer is full: the thread has wake-ups waiting anyway
            pass

    def _loop(self) -> None:
        while True:
            with self._lock:
                item = self._work.popleft() if self._work else None
                if item is None:
                    if self._closed:
                        return
                    self._sleeping = True
            if item is not None:
                self._execute(*item)
                ready = self._selector.select(0)  # sockets first between pieces of work
            else:
                ready = self._selector.select()
                with self._lock:
                    self._sleeping = False
            for key, _ in ready:
                if key.data is None:
                    self._drain()
                    continue
                try:
                    key.data()
                except Exception:
                    log.exception("a socket reader failed on the compute thread")

    def _execute(self, future: Future[Any], call: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = call(*args)
        except BaseException as error:  # the caller gets it, as from any executor
            future.set_exception(error)
        else:
            future.set_result(result)

    def _drain(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass


def executor() -> ComputeThread:
    """The process's compute thread (started on first use)."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = ComputeThread()
            # Clean-ups run on the thread before the interpreter ends it.
            threading._register_atexit(_finish)  # type: ignore[attr-defined]
        return _thread


def at_exit(function: Callable[[], object]) -> None:
    """Call `function` on the compute thread when the interpreter finishes (once, however often given)."""
    with _lock:
        if function not in _at_exit:
            _at_exit.append(function)


def _finish() -> None:
    for function in list(_at_exit):
        try:
            run(function)
        except Exception:  # the process is ending: say so, and go on with the other clean-ups
            log.exception("clean-up %r failed on the compute thread", function)
    if _thread is not None:
        _thread.shutdown(wait=True)


def on_compute_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread.thread


def run(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on the compute thread; the caller waits. Called there, it runs at once."""
    return executor().run(function, *args)


def post(function: Callable[..., object], *args: Any) -> None:
    """`function(*args)` on the compute thread, not waited for: it answers for itself (an error that
    escapes it is logged)."""
    executor().submit(function, *args).add_done_callback(_log_failure)


def _log_failure(done: Future[object]) -> None:
    error = done.exception()
    if error is not None:
        log.error("work posted to the compute thread failed", exc_info=error)


def watch(sock: socket.socket, reader: Callable[[], object]) -> None:
    """Have the compute thread call `reader()` whenever `sock` is readable (bytes, or its end), until
    `unwatch(sock)`. The reader must not wait for more bytes than are there."""
    executor().watch(sock, reader)


def unwatch(sock: socket.socket) -> None:
    executor().unwatch(sock)


async def run_async(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on the compute thread, awaited: the event loop goes on meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(executor(), function, *args)
