"""The one thread of a process on which every engine computation runs: steps, loads, calibrations.

The CPU kernels of ggml and of PyTorch run their parallel work on OpenMP, and GNU libgomp keeps a team of
threads for every thread that ever started a parallel region; a team's idle threads stay for the life of
the thread that made it. Once a process holds more such threads than the machine has cores, libgomp stops
spinning at its barriers and sleeps in the kernel instead, and a decode step passes hundreds of barriers
(ggml: a few per graph node). Measured on a 2-core machine, a Qwen3-0.6B-shaped q8_0 ggml stage served
13 tokens/s where the same stage alone decodes 19, because its calibration had run on another thread than
its steps. So a process computes on this one thread only; the others hand their work to it and wait
(about 10 µs each way).

An engine whose library keeps state per thread (MLX's streams) registers its clean-up with `at_exit`: it
runs on the compute thread when the interpreter finishes, before that thread ends. MLX 0.32 otherwise
aborts the process at exit now and then ("terminate called without an active exception") when the
thread that made its streams ends before them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread: threading.Thread | None = None
_at_exit: list[Callable[[], object]] = []

log = logging.getLogger(__name__)


def executor() -> ThreadPoolExecutor:
    """The process's compute thread, as an executor of one worker (started on first use)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
            _executor.submit(_mark).result()
            # Called before concurrent.futures ends its workers: its own hook was registered first, and
            # the interpreter calls these hooks in reverse order.
            threading._register_atexit(_finish)  # type: ignore[attr-defined]
        return _executor


def _mark() -> None:
    global _thread
    _thread = threading.current_thread()


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


def on_compute_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def run(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on the compute thread; the caller waits. Called there, it runs at once."""
    if on_compute_thread():
        return function(*args)
    return executor().submit(function, *args).result()


def post(function: Callable[..., object], *args: Any) -> None:
    """`function(*args)` on the compute thread, not waited for: it answers for itself (an error that
    escapes it is logged)."""
    executor().submit(function, *args).add_done_callback(_log_failure)


def _log_failure(done: Future[object]) -> None:
    error = done.exception()
    if error is not None:
        log.error("work posted to the compute thread failed", exc_info=error)


async def run_async(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on the compute thread, awaited: the event loop goes on meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(executor(), function, *args)
