"""The commands' event loop: uvloop's where it is installed, asyncio's own with MESHLLM_UVLOOP=0."""

from __future__ import annotations

import asyncio

import pytest

from meshllm.cli import event_loop


async def loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_commands_run_on_uvloop_where_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv(event_loop.UVLOOP_ENV, raising=False)
    assert event_loop.run(loop_module()).startswith("uvloop")


def test_meshllm_uvloop_0_runs_them_on_asyncios_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.UVLOOP_ENV, "0")
    assert event_loop.run(loop_module()).startswith("asyncio")
