"""Worker processes on this machine: started on free ports, answering Health, started again when they die."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

from meshllm.runtime.local_workers import LocalWorkers, free_ports
from meshllm.transport.stage_client import StageClient


def test_free_ports_are_distinct() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(1024 < port < 65536 for port in ports)


def test_a_worker_that_dies_is_started_again_on_its_address() -> None:
    workers = LocalWorkers()
    exits: list[tuple[str, str]] = []

    async def run() -> tuple[int, int, str]:
        (address,) = workers.spawn(1, token="t", threads=1, output=subprocess.DEVNULL)
        await workers.wait_healthy(token="t")
        first = workers.pids[0]
        supervising = asyncio.create_task(
            workers.supervise(on_exit=lambda *exit: exits.append(exit), interval=0.1)
        )
        os.kill(first, signal.SIGKILL)
        client = StageClient(address.name, address.address, "t")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if workers.pids[0] != first:
                    try:
                        health = await client.health(timeout=1.0)
                        return first, workers.pids[0], health.message
                    except Exception:
                        pass
                await asyncio.sleep(0.2)
            raise AssertionError(f"not started again: {exits}")
        finally:
            supervising.cancel()
            await client.close()

    try:
        first, second, message = asyncio.run(run())
    finally:
        workers.stop()
    assert second != first and message == "waiting for Load"
    assert exits and exits[0][0] == "worker1" and "exited with signal SIGKILL" in exits[0][1]
    assert "starting it again in 1 s" in exits[0][1]


def test_the_token_reaches_the_worker_by_environment_even_when_it_looks_like_an_option() -> None:
    from meshllm.transport.stage_client import TokenRefused

    token = "-starts-with-a-dash"
    workers = LocalWorkers()

    async def run() -> tuple[str, BaseException | None]:
        (address,) = workers.spawn(1, token=token, threads=1, output=subprocess.DEVNULL)
        await workers.wait_healthy(token=token)
        good = StageClient(address.name, address.address, token)
        bad = StageClient(address.name, address.address, "another")
        try:
            message = (await good.health(timeout=5.0)).message
            try:
                await bad.health(timeout=5.0)
                refused = None
            except TokenRefused as error:
                refused = error
            return message, refused
        finally:
            await good.close()
            await bad.close()

    try:
        message, refused = asyncio.run(run())
        with open(f"/proc/{workers.pids[0]}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
    finally:
        workers.stop()
    assert message == "waiting for Load" and refused is not None
    assert token.encode() not in argv
