"""Forward under fuzzing: two real worker processes ([0, 2) then [2, 4) of a tiny checkpoint) get
hypothesis-generated steps over gRPC, most of them malformed (shapes that disagree with the segments,
negative or skipping positions, unknown sequences, huge dimensions, NaN activations, truncated tensors,
wrong dtypes, nonsense sampling). Each step gets exactly one answer (an error naming the worker, or a
result), no worker goes down, and a sequence started before the fuzz goes on with exactly the tokens an
undisturbed stage computes."""

from __future__ import annotations

import asyncio
import math
import queue
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshllm.models.checkpoint import Checkpoint
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import LayerRange, SamplingParams, Segment, StepInput
from meshllm.transport import codec
from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.proto import meshllm_pb2_grpc as pbg
from meshllm.transport.rpc import token_metadata
from meshllm.transport.stage import LoadSpec
from meshllm.transport.stage_client import StageClient

TOKEN = "fuzz-token"
HIDDEN = 64  # the tiny checkpoint's hidden size
VICTIM = 1 << 50  # the sequence that must come through the fuzz untouched; fuzzed ids stay below 64
PROMPT = [5, 17, 42, 99, 3]


class ForwardStream:
    """One Forward stream to a worker, used one step at a time: send a message, read its answer."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self._requests: queue.Queue[pb.StepRequest | None] = queue.Queue()
        stub = pbg.StageStub(self.channel)  # type: ignore[no-untyped-call]
        self._results: Iterator[pb.StepResult] = stub.Forward(
            iter(self._requests.get, None), metadata=token_metadata(TOKEN)
        )

    def step(self, request: pb.StepRequest) -> pb.StepResult:
        self._requests.put(request)
        return next(self._results)

    def close(self) -> None:
        self._requests.put(None)
        self.channel.close()


def tensors() -> st.SearchStrategy[pb.Tensor]:
    """Tensors whose dtype, shape and bytes may or may not agree."""
    dtype = st.sampled_from(["float32", "bfloat16", "float16", "int32", "int64", "uint8", "float64", ""])
    small = st.integers(-2, 12)
    huge = st.sampled_from([1 << 31, 1 << 40, (1 << 62) + 1])
    shape = st.lists(st.one_of(small, st.integers(60, 70), huge), max_size=3)
    return st.builds(
        lambda d, s, data: pb.Tensor(dtype=d, shape=s, data=data), dtype, shape, st.binary(max_size=600)
    )


def consistent_hidden(n_tokens: int, values: list[float], dtype: str) -> pb.Tensor:
    """Hidden states of the right shape for `n_tokens` (values repeated), possibly NaN or infinite."""
    array = np.resize(np.asarray(values or [0.0], dtype=np.float32), (n_tokens, HIDDEN))
    return pb.Tensor(data=array.astype(dtype).tobytes(), shape=[n_tokens, HIDDEN], dtype=dtype)


def narrow_hidden(n_tokens: int, width: int) -> pb.Tensor:
    return pb.Tensor(
        data=np.zeros((n_tokens, width), np.float32).tobytes(), shape=[n_tokens, width], dtype="float32"
    )


@st.composite
def well_formed(draw: st.DrawFn) -> pb.StepRequest:
    """A step a stage can compute: new sequences from position 0, sane sampling, the right input."""
    seq_ids = draw(st.lists(st.integers(0, 63), min_size=1, max_size=3, unique=True))
    segments = [
        pb.Segment(
            seq_id=seq_id,
            start_pos=0,
            n_tokens=draw(st.integers(1, 4)),
            sample=draw(st.booleans()),
            sampling=pb.Sampling(
                temperature=draw(st.floats(0, 2)),
                top_p=draw(st.floats(0.05, 1)),
                top_k=draw(st.integers(0, 8)),
            ),
        )
        for seq_id in seq_ids
    ]
    request = pb.StepRequest(step_id=draw(st.integers(0, 1 << 40)), segments=segments)
    n_tokens = sum(s.n_tokens for s in segments)
    if draw(st.booleans()):
        ids = np.asarray(draw(st.lists(st.integers(0, 255), min_size=n_tokens, max_size=n_tokens)), np.int64)
        request.token_ids.CopyFrom(pb.Tensor(data=ids.tobytes(), shape=[n_tokens], dtype="int64"))
    else:
        request.hidden_states.CopyFrom(
            consistent_hidden(n_tokens, draw(st.lists(st.floats(-4, 4))), "float32")
        )
    return request


@st.composite
def steps(draw: st.DrawFn) -> pb.StepRequest:
    if draw(st.integers(0, 4)) == 0:
        return draw(well_formed())
    floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
    segments = draw(
        st.lists(
            st.builds(
                pb.Segment,
                seq_id=st.integers(0, 63),
                start_pos=st.one_of(st.integers(-3, 12), st.sampled_from([1 << 40, (1 << 63) - 1])),
                n_tokens=st.one_of(st.integers(-2, 6), st.sampled_from([1 << 20, (1 << 31) - 1])),
                sample=st.booleans(),
                sampling=st.builds(
                    pb.Sampling,
                    temperature=st.one_of(st.just(0.0), floats),
                    top_p=st.one_of(st.just(1.0), floats),
                    top_k=st.integers(-2, 1 << 20),
                    min_tokens=st.integers(-2, 4),
                    eos_token_ids=st.lists(st.integers(-(1 << 62), 1 << 62), max_size=3),
                ),
                sampled=st.one_of(st.none(), st.integers(-3, 8)),
            ),
            max_size=4,
        )
    )
    request = pb.StepRequest(step_id=draw(st.integers(0, (1 << 64) - 1)), segments=segments)
    n_tokens = max(0, sum(max(s.n_tokens, 0) for s in segments))
    plausible = 0 < n_tokens <= 64
    kind = draw(st.sampled_from(["ids", "hidden", "both", "neither", "random"]))
    if kind in ("ids", "both"):
        ids = draw(st.lists(st.integers(-5, 300), min_size=n_tokens if plausible else 0, max_size=64))
        request.token_ids.CopyFrom(
            pb.Tensor(data=np.asarray(ids, dtype=np.int64).tobytes(), shape=[len(ids)], dtype="int64")
        )
    if kind in ("hidden", "both") and plausible:
        values = draw(st.lists(st.floats(width=32), max_size=8))
        dtype = draw(st.sampled_from(["float32", "float16"]))
        request.hidden_states.CopyFrom(consistent_hidden(n_tokens, values, dtype))
    if kind == "random":
        request.hidden_states.CopyFrom(draw(tensors()))
        if draw(st.booleans()):
            request.token_ids.CopyFrom(draw(tensors()))
    return request


def reference_tokens(path: str) -> list[int]:
    """Greedy tokens of the victim after its prompt and one decode step, on one undisturbed stage."""
    host = LocalStageHost("ref", engine="torch")
    host.load(LoadSpec(path, LayerRange(0, 4), "float32"), lambda _: None)
    greedy = SamplingParams(seed=1)
    first = host.step(StepInput(1, [Segment(VICTIM, 0, len(PROMPT), True, greedy)], np.array(PROMPT)))
    assert first.tokens
    token = first.tokens[0].token_id
    second = host.step(StepInput(2, [Segment(VICTIM, len(PROMPT), 1, True, greedy)], np.array([token])))
    assert second.tokens
    return [token, second.tokens[0].token_id]


def load_chain(path: str, first: str, second: str) -> None:
    async def load() -> None:
        clients = [StageClient("w1", first, TOKEN), StageClient("w2", second, TOKEN)]
        try:
            await clients[1].load(LoadSpec(path, LayerRange(2, 4), "float32"), "", lambda _: None)
            await clients[0].load(LoadSpec(path, LayerRange(0, 2), "float32"), second, lambda _: None)
        finally:
            for client in clients:
                await client.close()

    asyncio.run(load())


def token_step(step_id: int, start: int, ids: list[int]) -> pb.StepRequest:
    segment = Segment(VICTIM, start, len(ids), sample=True, sampling=SamplingParams(seed=1))
    return codec.encode_step(StepInput(step_id, [segment], token_ids=np.array(ids, dtype=np.int64)))


@pytest.mark.slow
def test_fuzzed_forward_steps_are_refused_one_by_one_and_the_workers_keep_serving(
    tiny_checkpoint, start_workers
) -> None:
    path = str(tiny_checkpoint())
    first, second = start_workers(2, token=TOKEN)
    load_chain(path, first.address, second.address)
    expected = reference_tokens(path)
    vocab_size = Checkpoint.open(path).config.vocab_size
    into_first, into_second = ForwardStream(first.address), ForwardStream(second.address)
    try:
        prefilled = into_first.step(token_step(1, 0, PROMPT))
        assert prefilled.error == "" and [t.token_id for t in prefilled.tokens] == expected[:1]
        answers = {"refused": 0, "served": 0}

        @settings(
            max_examples=150,
            derandomize=True,  # the same messages on every run
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(request=steps(), last_stage=st.booleans())
        def send(request: pb.StepRequest, last_stage: bool) -> None:
            answer = (into_second if last_stage else into_first).step(request)
            assert answer.step_id == request.step_id
            if answer.error:
                assert answer.error.startswith(("worker w1: ", "worker w2: ")), answer.error
                answers["refused"] += 1
            else:
                assert all(
                    0 <= t.token_id < vocab_size and not math.isnan(t.logprob) for t in answer.tokens
                ), answer
                answers["served"] += 1

        send()
        assert answers["refused"] > 80 and answers["served"] > 5  # mostly what no stage can compute
        assert first.process.poll() is None and second.process.poll() is None

        # Bytes that are no protobuf at all end only the stream they came on, with an error naming the worker.
        garbage = into_first.channel.stream_stream(
            "/meshllm.Stage/Forward",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.StepResult.FromString,
        )
        with pytest.raises(grpc.RpcError, match="worker w1: Error parsing message"):
            list(garbage(iter([b"\xff\xff\xff\x0f not a step"]), metadata=token_metadata(TOKEN)))

        decoded = into_first.step(token_step(2, len(PROMPT), expected[:1]))
        assert decoded.error == "" and [t.token_id for t in decoded.tokens] == expected[1:]
        assert [t.stage for t in decoded.timings] == ["w1", "w2"]
    finally:
        into_first.close()
        into_second.close()


@pytest.mark.parametrize(
    ("mutate", "refusal"),
    [
        (lambda r: r.hidden_states.CopyFrom(consistent_hidden(5, [math.nan], "float32")), "NaN"),
        (lambda r: setattr(r.hidden_states, "data", r.hidden_states.data[:-4]), "bytes for shape"),
        (lambda r: r.hidden_states.shape.__setitem__(1, 1 << 40), "bytes for shape"),
        (lambda r: setattr(r.hidden_states, "dtype", "int64"), "dtype 'int64'"),
        (lambda r: setattr(r.segments[0], "start_pos", -1), "start_pos -1"),
        (lambda r: setattr(r.segments[0], "start_pos", 7), "not known here"),
        (lambda r: setattr(r.segments[0], "n_tokens", 4), "for 4 tokens"),
        (lambda r: r.hidden_states.CopyFrom(narrow_hidden(5, 32)), "not \\[5, 64\\]"),
    ],
    ids=[
        "nan",
        "truncated",
        "huge",
        "dtype",
        "negative-position",
        "unknown-sequence",
        "shape",
        "width",
    ],
)
def test_each_kind_of_malformed_step_gets_its_own_named_error(tiny_checkpoint, mutate, refusal) -> None:
    """The stage host behind a last stage, given each kind of bad step directly (no process needed)."""
    host = LocalStageHost("w2", engine="torch")
    host.load(LoadSpec(str(tiny_checkpoint()), LayerRange(2, 4), "float32"), lambda _: None)
    segment = Segment(3, 0, 5, sample=True, sampling=SamplingParams(seed=1))
    request = codec.encode_step(StepInput(1, [segment], hidden_states=np.ones((5, HIDDEN), np.float32)))
    mutate(request)
    with pytest.raises(Exception, match=refusal) as raised:
        host.step(codec.decode_step(request, "torch"))
    assert type(raised.value).__name__ == "MalformedStep" and host.info().live_sequences == 0
