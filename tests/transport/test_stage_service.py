"""The stage service and its client over real gRPC on 127.0.0.1, in this process: a stage host served by
`serve_stage`, called by `StageClient` and `ForwardChain`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest

from meshllm.devices import LayerShape, Link, Precision, StageInfo
from meshllm.errors import StageError
from meshllm.runtime.local_workers import free_ports
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import LayerRange, SamplingParams, Segment, StepInput
from meshllm.transport.stage import LoadSpec
from meshllm.transport.stage_client import ForwardChain, StageClient, TokenRefused, prepare_step
from meshllm.transport.stage_service import serve_stage
from tests.conftest import free_port

TOKEN = "s3cret"


@contextlib.asynccontextmanager
async def served(count: int) -> AsyncIterator[list[StageClient]]:
    """`count` stage services on free ports of 127.0.0.1, and a client of each."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(count)]
    servers = [
        asyncio.create_task(serve_stage(LocalStageHost(f"s{i}", engine="torch"), address, token=TOKEN))
        for i, address in enumerate(addresses)
    ]
    clients = [StageClient(f"s{i}", address, TOKEN) for i, address in enumerate(addresses)]
    try:
        await answering(clients)
        yield clients
    finally:
        for client in clients:
            await client.close()
        for server in servers:
            server.cancel()
        await asyncio.gather(*servers, return_exceptions=True)


async def answering(clients: list[StageClient]) -> None:
    """Returns once every client's stage answers Health (or after about five seconds each)."""
    for client in clients:
        for _ in range(100):
            with contextlib.suppress(StageError):
                await client.health(timeout=0.5)
                break
            await asyncio.sleep(0.05)


def test_load_streams_progress_and_info_reports_the_range(tiny_checkpoint) -> None:
    async def run() -> tuple[list[str], object, object]:
        async with served(1) as (client,):
            before = await client.info(timeout=60)  # the first Info imports the engine
            messages: list[str] = []
            spec = LoadSpec(str(tiny_checkpoint()), LayerRange(1, 3), "float32")
            await client.load(spec, "", lambda update: messages.append(update.message))
            return messages, before, await client.info()

    messages, before, after = asyncio.run(run())
    assert messages[0].startswith("loading layers [1, 3) of ")
    assert messages[-1].startswith("layers [1, 3) loaded in ")
    assert before.layers is None and after.layers == (1, 3) and after.num_layers == 4


def test_a_failed_load_names_the_worker_and_the_cause(tiny_checkpoint) -> None:
    async def run() -> None:
        async with served(1) as (client,):
            await client.load(LoadSpec(str(tiny_checkpoint()), LayerRange(2, 9), "float32"), "", print)

    with pytest.raises(StageError, match=r"device 's0' .* failed to load: worker s0: layer range \[2, 9\)"):
        asyncio.run(run())


def test_a_step_through_two_services_comes_back_sampled_with_both_timings(tiny_checkpoint) -> None:
    path = str(tiny_checkpoint())

    async def run():
        async with served(2) as (first, second):
            await second.load(LoadSpec(path, LayerRange(2, 4), "float32"), "", print)
            await first.load(LoadSpec(path, LayerRange(0, 2), "float32"), second.address, print)
            chain = ForwardChain([first, second], step_timeout=30)
            segments = [Segment(5, 0, 3, sample=True, sampling=SamplingParams(seed=1))]
            result = await chain.submit(prepare_step(StepInput(1, segments, token_ids=np.array([4, 5, 6]))))
            live = [await first.release([5]), await second.release([5])]
            await chain.reset()
            return result, live

    result, live = asyncio.run(run())
    assert [token.seq_id for token in result.tokens] == [5]
    assert [timing.stage for timing in result.timings] == ["s0", "s1"]
    assert live == [0, 0]


def test_a_client_without_the_token_is_refused_by_name() -> None:
    async def run() -> None:
        async with served(1) as (client,):
            stranger = StageClient("s0", client.address, token="wrong")
            try:
                await stranger.info()
            finally:
                await stranger.close()

    with pytest.raises(
        TokenRefused, match=r"device 's0' .* refused the cluster token .*a wrong cluster token"
    ):
        asyncio.run(run())


def test_load_quantizes_as_asked_and_info_measures_the_read_speed(tiny_checkpoint) -> None:
    async def run():
        async with served(1) as (client,):
            spec = LoadSpec(str(tiny_checkpoint()), LayerRange(0, 4), "bfloat16", quantize="int8")
            await client.load(spec, "", lambda _: None)
            return await client.info(timeout=120, calibrate=Precision("bfloat16", "int8"))

    info = asyncio.run(run())
    speeds = info.calibration
    assert (
        info.quantize == "int8" and speeds is not None and speeds.read_bandwidth > 0 and speeds.flop_rate > 0
    )
    assert speeds.decode_flop_rate > 0  # measured with them, and carried over gRPC


def test_info_times_a_layer_of_the_shape_asked_and_refuses_one_no_model_has() -> None:
    layer = LayerShape("llama", 128, 256, 4, 2, 32, context=32)

    async def run() -> tuple[StageInfo, list[str]]:
        async with served(1) as (client,):
            precision = Precision("float32")
            timed = await client.info(timeout=120, calibrate=precision, layer=layer)
            refusals = []
            for bad in (layer._replace(model_type="gpt2"), layer._replace(num_key_value_heads=3)):
                with pytest.raises(StageError) as refused:
                    await client.info(timeout=120, calibrate=precision, layer=bad)
                refusals.append(str(refused.value))
            return timed, refusals

    timed, refusals = asyncio.run(run())
    # carried over gRPC
    speeds = timed.calibration
    assert speeds is not None
    assert min(speeds.layer_token_seconds, speeds.layer_prompt_seconds, speeds.layer_step_seconds) > 0
    assert "layer model_type 'gpt2' is not one of llama" in refusals[0]
    assert "num_attention_heads 4 is not a multiple of num_key_value_heads 3" in refusals[1]


def test_links_are_timed_from_the_caller_and_from_a_stage_to_the_next() -> None:
    async def run() -> tuple[Link, Link, str]:
        async with served(2) as (first, second):
            mine = await first.measure_link(rounds=5, payload_bytes=1 << 16)
            theirs = await first.probe(second.address, rounds=5, payload_bytes=1 << 16)
            try:
                await first.probe(f"127.0.0.1:{free_port()}", rounds=1, payload_bytes=1, timeout=30)
            except StageError as error:
                return mine, theirs, str(error)
            raise AssertionError("a probe of a closed port succeeded")

    mine, theirs, error = asyncio.run(run())
    for link in (mine, theirs):
        assert 0 < link.round_trip < 1.0 and link.bandwidth > 1e6
    assert "worker s0 to 127.0.0.1:" in error
