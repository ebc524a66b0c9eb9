"""Every engine computation of a process runs on its one compute thread (`meshllm.compute`): calls from
other threads wait for it there, calls made on it run at once, and a worker's calibration, load and steps,
over step links and over gRPC alike, all reach the stage on that thread."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshllm import compute
from meshllm.devices import Precision
from meshllm.engines import load_stage
from meshllm.runtime.engine_client import GenerateRequest
from meshllm.runtime.engine_loop import EngineLoop
from meshllm.runtime.pipeline import Pipeline
from meshllm.runtime.scheduler import Scheduler
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import LayerRange, PipelineError, SamplingParams, Segment, StepInput
from meshllm.transport.stage_client import ForwardChain
from meshllm.transport.step_link import CoordinatorLink, StepChain
from tests.transport.test_step_link import chain_of_two, step


def the_compute_thread() -> threading.Thread:
    return compute.run(threading.current_thread)


def test_work_from_other_threads_runs_on_the_one_compute_thread_and_nested_work_runs_at_once() -> None:
    here = threading.current_thread()
    thread = the_compute_thread()
    assert thread is not here and thread.name.startswith("compute")
    seen: list[threading.Thread] = []
    others = [threading.Thread(target=lambda: seen.append(the_compute_thread())) for _ in range(3)]
    for other in others:
        other.start()
    for other in others:
        other.join()
    assert seen == [thread] * 3
    # called on the compute thread itself it runs inline: no deadlock waiting for itself
    assert compute.run(lambda: compute.run(threading.current_thread)) is thread
    assert asyncio.run(compute.run_async(threading.current_thread)) is thread


def test_an_error_on_the_compute_thread_reaches_the_caller_and_the_thread_serves_on() -> None:
    def fail() -> None:
        raise ValueError("the stage refused")

    with pytest.raises(ValueError, match="the stage refused"):
        compute.run(fail)
    assert compute.run(lambda: 6 * 7) == 42


def recording(monkeypatch: pytest.MonkeyPatch, names: list[str]) -> list[tuple[str, threading.Thread]]:
    """Each call of these `LocalStageHost` methods with the thread it ran on (the methods themselves
    run as they are)."""
    calls: list[tuple[str, threading.Thread]] = []
    for name in names:
        original: Callable[..., Any] = getattr(LocalStageHost, name)

        def wrapped(self: LocalStageHost, *args: Any, _name: str = name, _original=original, **kwargs: Any):
            calls.append((_name, threading.current_thread()))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(LocalStageHost, name, wrapped)
    return calls


def test_a_workers_calibration_load_and_steps_over_links_and_grpc_run_on_the_compute_thread(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = recording(monkeypatch, ["calibrate", "load", "step", "release"])

    async def run() -> None:
        async with chain_of_two(str(tiny_checkpoint())) as (clients, _):
            await clients[0].info(timeout=60, calibrate=Precision("float32"), volume=1 << 20)
            linked = StepChain(clients, step_timeout=30)
            await linked.submit(step(1, 10, [4, 5, 6]))
            assert linked.linked
            await linked.reset()
            grpc = ForwardChain(clients, step_timeout=30)
            await grpc.submit(step(2, 11, [4, 5, 6]))
            await grpc.reset()
            await clients[0].release([10, 11])

    asyncio.run(run())
    kinds = {name for name, _ in calls}
    assert kinds == {"calibrate", "load", "step", "release"}, kinds
    # two loads, one calibration, two steps on each of the two stages, one release
    assert len(calls) == 8, calls
    assert {thread for _, thread in calls} == {the_compute_thread()}


def test_a_local_pipeline_steps_on_the_compute_thread(tiny_checkpoint, monkeypatch) -> None:
    calls = recording(monkeypatch, ["step"])
    path = tiny_checkpoint()
    stages = compute.run(
        lambda: [load_stage("torch", str(path), r) for r in (LayerRange(0, 2), LayerRange(2, 4))]
    )

    async def run() -> list[int]:
        loop = EngineLoop.in_process(stages)
        request = GenerateRequest([4, 5, 6], SamplingParams(temperature=0.0), max_tokens=3)
        tokens = [token.token_id async for token in loop.submit(request)]
        await loop.close()
        return tokens

    assert len(asyncio.run(run())) == 3
    assert calls and {thread for _, thread in calls} == {the_compute_thread()}


CLEAN_UPS = """
import threading
from meshllm import compute

def report(word):
    print(word, threading.current_thread().name, flush=True)

compute.at_exit(lambda: report("first"))
compute.at_exit(lambda: 1 / 0)  # a failing clean-up is logged; the others still run
compute.at_exit(lambda: report("last"))
compute.run(lambda: None)
"""

MLX_STAGE_LEFT_AT_EXIT = """
import asyncio, sys
from meshllm import compute
from meshllm.engines import load_stage
from meshllm.runtime.engine_client import GenerateRequest
from meshllm.runtime.engine_loop import EngineLoop
from meshllm.step import LayerRange, SamplingParams

stages = compute.run(lambda: [load_stage("mlx", sys.argv[1], LayerRange(0, int(sys.argv[2])))])

async def main():
    loop = EngineLoop.in_process(stages)
    request = GenerateRequest([4, 5, 6], SamplingParams(temperature=0.0), 3)
    tokens = [token.token_id async for token in loop.submit(request)]
    await loop.close()
    print(len(tokens))

asyncio.run(main())
"""


def run_script(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(text)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)


def test_clean_ups_given_to_at_exit_run_on_the_compute_thread_as_the_process_ends(tmp_path) -> None:
    done = run_script(tmp_path, CLEAN_UPS)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[0::2] == ["first", "last"], done.stdout
    assert all(name.startswith("compute") for name in words[1::2]), done.stdout
    assert "ZeroDivisionError" in done.stderr


def test_a_process_that_stepped_an_mlx_stage_on_the_compute_thread_exits_cleanly(
    tmp_path, tiny_checkpoint
) -> None:
    """MLX 0.32 aborted such a process at exit three times out of four ("terminate called without an
    active exception") until the MLX engine dropped its streams on the compute thread before it ended."""
    pytest.importorskip("mlx.core")
    checkpoint = tiny_checkpoint(layers=4)
    for _ in range(3):
        done = run_script(tmp_path, MLX_STAGE_LEFT_AT_EXIT, str(checkpoint), "4")
        assert (done.returncode, done.stdout.strip()) == (0, "3"), done.stderr


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_compute_thread_reads_the_sockets_it_watches_between_pieces_of_work() -> None:
    mine, theirs = socket.socketpair()
    seen: list[tuple[bytes, threading.Thread]] = []

    def reader() -> None:
        data = mine.recv(100)
        seen.append((data, threading.current_thread()))
        if not data:
            compute.unwatch(mine)

    compute.watch(mine, reader)
    try:
        theirs.sendall(b"one")
        wait_for(lambda: len(seen) == 1)
        # bytes that come while the thread works are read once that piece of work is done
        compute.run(lambda: (theirs.sendall(b"two"), time.sleep(0.05)))
        wait_for(lambda: len(seen) == 2)
        theirs.close()  # its end is read too, and the reader stops watching
        wait_for(lambda: len(seen) == 3)
        assert compute.run(lambda: mine.fileno() in compute.executor()._selector.get_map()) is False
    finally:
        mine.close()
    assert [data for data, _ in seen] == [b"one", b"two", b""]
    assert {thread for _, thread in seen} == {the_compute_thread()}


def test_a_socket_closed_while_watched_does_not_stop_its_descriptor_being_watched_again() -> None:
    first, _peer = socket.socketpair()
    compute.watch(first, lambda: None)
    number = first.fileno()
    first.close()  # never unwatched: the selector still holds its number
    for _ in range(20):  # Linux gives the lowest free descriptor; another thread may take it first
        mine, theirs = socket.socketpair()
        if number in (mine.fileno(), theirs.fileno()):
            break
        mine.close()
        theirs.close()
    else:
        pytest.skip(f"descriptor {number} was not given out again")
    if theirs.fileno() == number:
        mine, theirs = theirs, mine
    try:
        assert mine.fileno() == number
        read: list[bytes] = []
        compute.watch(mine, lambda: read.append(mine.recv(10)))  # refused before: "already registered"
        theirs.sendall(b"x")
        wait_for(lambda: read == [b"x"])
        compute.unwatch(mine)
    finally:
        for sock in (mine, theirs, _peer):
            sock.close()


def test_a_coordinator_writes_its_steps_to_a_link_on_the_compute_thread_and_samples_as_in_process(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local stage [0, 2), then a worker with [2, 4) over a step link: each step leaves from the compute
    thread the moment the local stage is done, and greedy decoding gives what one process gives."""
    writers: list[threading.Thread] = []
    original = CoordinatorLink.send

    def send(self: CoordinatorLink, body: bytes) -> None:
        writers.append(threading.current_thread())
        original(self, body)

    monkeypatch.setattr(CoordinatorLink, "send", send)
    path = tiny_checkpoint()
    first, second = compute.run(
        lambda: [load_stage("torch", str(path), r) for r in (LayerRange(0, 2), LayerRange(2, 4))]
    )
    request = GenerateRequest([4, 5, 6, 7], SamplingParams(temperature=0.0), max_tokens=5)

    async def generate(loop: EngineLoop) -> list[int]:
        tokens = [token.token_id async for token in loop.submit(request)]
        await loop.close()
        return tokens

    async def run() -> list[int]:
        async with chain_of_two(str(path)) as (clients, _):
            chain = StepChain([clients[1]], step_timeout=30)
            pipeline = Pipeline([LocalStageHost.of("coordinator", first)], chain)
            return await generate(EngineLoop(Scheduler(pipeline.depth), pipeline))

    linked_tokens = asyncio.run(run())
    assert len(writers) == 1 + 5 - 1  # the prompt, then a decode step per further token
    assert set(writers) == {the_compute_thread()}
    assert linked_tokens == asyncio.run(generate(EngineLoop.in_process([first, second])))


def test_a_local_stage_failing_before_its_step_leaves_fails_that_step_only(tiny_checkpoint) -> None:
    path = tiny_checkpoint()
    first = compute.run(lambda: load_stage("torch", str(path), LayerRange(0, 2)))

    async def run() -> tuple[str, int, int]:
        async with chain_of_two(str(path)) as (clients, _):
            chain = StepChain([clients[1]], step_timeout=30)
            pipeline = Pipeline([LocalStageHost.of("coordinator", first)], chain)
            segments = [Segment(3, 0, 3, sample=True, sampling=SamplingParams(seed=1))]
            good = StepInput(1, segments, token_ids=np.array([4, 5, 6]))
            await pipeline.run_step(good)
            # a decode step at a position the sequence has not reached: the local stage refuses it
            bad = StepInput(2, [Segment(3, 9, 1, sample=True)], token_ids=np.array([7]))
            with pytest.raises(PipelineError) as failed:
                await pipeline.run_step(bad)
            after = await pipeline.run_step(StepInput(3, [Segment(3, 3, 1, sample=True)], np.array([7])))
            left = len(chain._pending)
            await pipeline.close()
            return str(failed.value), len(after), left

    message, tokens_after, pending = asyncio.run(run())
    assert message.startswith("device 'coordinator' (local stage): "), message
    assert tokens_after == 1 and pending == 0
