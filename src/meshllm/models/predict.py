"""What a plan should give: decode tokens/s for one stream and for many, from measured figures.

A stage's step over `b` tokens costs two things: reading every weight it holds once (bytes over the
device's read speed, measured as decode reads them, one token's arithmetic included) and the arithmetic
of the other tokens (two operations per weight per token, over the device's measured compute rate: for a
decode step, the rate measured for many streams' decode over weights streamed from memory; for prompt
chunks, the rate of a batch of tokens). A token of one stream passes every stage and
every link in turn; many streams keep one micro-batch per compute unit in flight (one per stage where
each has a machine of its own; stages sharing one machine's cores take turns, `devices.compute_unit`),
so the busiest unit sets the pace once there are enough of them. Prefill is arithmetic: every prompt
token through every stage.

A decode token's attention also reads its sequence's cached keys and values (the prompt and half the new
tokens, on average), at the read speed. Where the calibration timed two random layers of the model's own
shape (`engines.layer_timing`), what each decode token past the first and each prompt token costs in a
layer is that timing, attention and the engine's own work per sequence included, instead of the layers'
share of the matmul rates; the lm_head's arithmetic stays at the matmul rates. A step takes at least
what its layers took in one-token steps over those random layers, whose weights stay close by: in an
eager engine the work around each kernel costs more than reading the weights. The figures leave out what
the measurements do not see (the sampler, the HTTP server); the prediction is a ceiling the measured speed
should come within a fair margin of.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

from meshllm.devices import Calibration, Link, steps_in_flight
from meshllm.models.balance import ModelCosts, StageSeconds
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.plan import HEADROOM, StagePlan, model_costs, model_weights, quantized_sizes, tensor_bytes
from meshllm.step import LayerRange


@dataclass(frozen=True)
class StageCost:
    device: str
    read_bytes: int  # weights read per decode step (the layers, and the lm_head on the last stage)
    weights: int  # multiply-adds per token: the weight elements a token passes through
    head_weights: int  # of which the lm_head's (prefill needs it for a prompt's last token only)
    read_bandwidth: float  # bytes/s
    flop_rate: float  # floating-point operations/s at a batch of tokens
    alone_read_bandwidth: float = 0.0  # bytes/s of a step alone in the pipeline (0: read_bandwidth)
    decode_flop_rate: float = 0.0  # operations/s a decode step of many streams adds (0: flop_rate)
    cache_bytes: int = 0  # bytes of keys and values this stage's layers hold per token of context
    layers: int = 0  # decoder layers
    # Timed on layers of the model's shape (0: not timed; the layers' share of the matmul rates instead):
    layer_token_seconds: float = 0.0  # what a decode token past the first adds to one layer
    layer_prompt_seconds: float = 0.0  # a prompt token in one layer
    layer_step_seconds: float = 0.0  # a one-token step in one layer, its weights close by
    head_bytes: int = 0  # of read_bytes, the final norm's and the lm_head's
    compute: str = ""  # what the device computes on (`devices.compute_unit`; "": a unit of its own)
    layer_token_seconds_alone: float = 0.0  # layer_token_seconds with a lone step's threads (0: the same)

    def step_seconds(
        self, tokens: int, head_tokens: int | None = None, alone: bool = False, context: int = 0
    ) -> float:
        """One step over `tokens` tokens, `head_tokens` of which need logits (all: a decode step, whose
        arithmetic runs at the decode rate; fewer: prompt chunks); `alone`: the only step in flight,
        which may take more threads. A decode token's attention reads its sequence's cached keys and
        values, `context` tokens of them."""
        bandwidth = (self.alone_read_bandwidth or self.read_bandwidth) if alone else self.read_bandwidth
        # The read speed was measured with one-token matmuls: a one-token step's arithmetic is in it. A step
        # takes at least what its layers took with their weights close by (an eager engine's work around
        # its kernels, which no matmul shows).
        read = max(
            self.read_bytes / bandwidth, self.layers * self.layer_step_seconds + self.head_bytes / bandwidth
        )
        # On a lone step's threads, the arithmetic (the head's, prompt chunks') gains as a layer's decode
        # token did (1 where that was not timed).
        gain = self.alone_gain() if alone else 1.0
        if head_tokens is None or head_tokens == tokens:  # decode: each token past the first adds its own
            decode_rate = self.decode_flop_rate or self.flop_rate
            if self.layer_token_seconds:  # timed with its attention over as much context
                first = context * self.cache_bytes / bandwidth
                added = (self.layers * self.layer_token_seconds + 2 * self.head_weights / decode_rate) / gain
                return read + first + (tokens - 1) * added
            attention = tokens * context * self.cache_bytes / bandwidth
            return read + attention + 2 * self.weights * (tokens - 1) / decode_rate
        head = 2 * self.head_weights * head_tokens / (self.flop_rate * gain)
        if self.layer_prompt_seconds:
            return read + tokens * self.layers * self.layer_prompt_seconds / gain + head
        return read + 2 * (self.weights - self.head_weights) * tokens / (self.flop_rate * gain) + head

    def alone_gain(self) -> float:
        """How much faster a decode token's arithmetic ran on a lone step's threads (1: not timed)."""
        if self.layer_token_seconds and self.layer_token_seconds_alone:
            return self.layer_token_seconds / self.layer_token_seconds_alone
        return 1.0

    def sharing(self, stages: int) -> StageCost:
        """The cost while `stages` stages of its compute unit compute at once: together they read at
        most what a step alone reads with every thread (the unit's memory is one), each its share."""
        if stages < 2 or not self.alone_read_bandwidth:
            return self
        return replace(self, read_bandwidth=min(self.read_bandwidth, self.alone_read_bandwidth / stages))


@dataclass(frozen=True)
class Prediction:
    one_stream: float  # decode tokens/s of a lone stream
    streams: int
    many_streams: float  # total decode tokens/s of `streams` streams together
    many_streams_total: float  # the same with their prefill counted (prompt_tokens each)
    prompt_tokens: int
    new_tokens: int


def mean_context(prompt_tokens: int, new_tokens: int) -> int:
    """A decode token's cache, on average: the prompt and half the new tokens."""
    return prompt_tokens + new_tokens // 2


PROMPT_TOKENS = 128  # each predicted stream's prompt
NEW_TOKENS = 64  # and the tokens it generates
MEAN_CONTEXT = mean_context(PROMPT_TOKENS, NEW_TOKENS)  # what layers are timed with


def predict(
    stages: list[StageCost],
    links: list[Link],  # between consecutive stages, in chain order
    activation_bytes: int,  # a token's hidden state on the wire
    streams: int,
    prompt_tokens: int = PROMPT_TOKENS,
    new_tokens: int = NEW_TOKENS,
    take_turns: bool = True,  # stages on one compute unit take turns; False: they compute at once
) -> Prediction:
    if not stages or streams < 1:
        raise ValueError("a prediction needs at least one stage and one stream")

    def hops(tokens: int) -> float:
        return sum(link.seconds(tokens * activation_bytes) for link in links)

    context = mean_context(prompt_tokens, new_tokens)
    units = [(stage.compute if take_turns else "") or f"stage {index}" for index, stage in enumerate(stages)]
    if not take_turns:  # stages of one unit computing at once share its memory's bandwidth
        shared = Counter(stage.compute for stage in stages if stage.compute)
        stages = [stage.sharing(shared[stage.compute]) if stage.compute else stage for stage in stages]

    def busiest(times: list[float]) -> float:
        """The most time one compute unit spends on its stages' share (stages of one unit take turns)."""
        spent: dict[str, float] = {}
        for unit, seconds in zip(units, times, strict=True):
            spent[unit] = spent.get(unit, 0.0) + seconds
        return max(spent.values())

    def cycle(batch: int, in_flight: int) -> float:
        """Seconds for every one of the streams to gain a token."""
        times = [stage.step_seconds(batch, alone=in_flight == 1, context=context) for stage in stages]
        return max(sum(times) + hops(batch), in_flight * busiest(times))

    one = 1.0 / cycle(1, 1)
    in_flight = min(steps_in_flight(units), streams)
    batch = math.ceil(streams / in_flight)
    decode_cycle = cycle(batch, in_flight)
    prefill = [
        stage.step_seconds(prompt_tokens * streams, head_tokens=streams, alone=in_flight == 1)
        for stage in stages
    ]
    # Prompts follow each other through the compute units: the busiest one's share, plus the rest once.
    slowest = busiest(prefill)
    prefill_seconds = slowest + (sum(prefill) - slowest) / streams + hops(prompt_tokens)
    total = streams * new_tokens / (prefill_seconds + new_tokens * decode_cycle)
    return Prediction(one, streams, streams / decode_cycle, total, prompt_tokens, new_tokens)


def best_schedule(
    stages: list[StageCost], links: list[Link], activation_bytes: int, streams: int
) -> tuple[Prediction, bool]:
    """The faster way for stages that share a compute unit (one machine's cores) to serve `streams`:
    taking turns, one step in flight per unit with the whole batch on every core, or computing at
    once, a micro-batch each on their share of the cores (an engine whose steps gain little from more
    threads gains more from the overlap), by the tokens/s of the streams with their prompts. Its
    prediction, and whether it is taking turns; stages on units of their own have only the one way
    (False)."""
    together = predict(stages, links, activation_bytes, streams, take_turns=False)
    if steps_in_flight([stage.compute for stage in stages]) == len(stages):
        return together, False
    turns = predict(stages, links, activation_bytes, streams, take_turns=True)
    faster = turns.many_streams_total > together.many_streams_total  # with their prompts: they wait too
    return (turns, True) if faster else (together, False)


class CostModel:
    """A checkpoint's costs as the devices would hold it: its file headers read once, each quantization's
    sizes worked out once."""

    def __init__(self, checkpoint: Checkpoint, dtype: str, group_size: int):
        self.checkpoint, self.dtype, self.group_size = checkpoint, dtype, group_size
        self.sizes = tensor_bytes(checkpoint, dtype)
        self.weights = model_weights(checkpoint)
        self._held: dict[str | None, ModelCosts] = {}

    def held(self, quantize: str | None) -> ModelCosts:
        """Bytes of each part as a device holding its linear layers as `quantize` holds them."""
        if quantize not in self._held:
            quantized = quantized_sizes(self.checkpoint, self.dtype, quantize, self.group_size)
            self._held[quantize] = model_costs(self.sizes, self.checkpoint, quantized)
        return self._held[quantize]

    def cost(
        self,
        device: str,
        layers: LayerRange,
        quantize: str | None,
        calibration: Calibration,
        compute: str = "",
    ) -> StageCost:
        start, end = layers
        last = end == len(self.weights.layers)
        # keys and values of every layer, in the activations' dtype (16-bit unless float32)
        cache = self.checkpoint.config.kv_bytes_per_token(end - start, 4 if self.dtype == "float32" else 2)
        return StageCost(
            device,
            self.held(quantize).read(start, end),
            self.weights.read(start, end),
            self.weights.head if last else 0,
            calibration.read_bandwidth,
            calibration.flop_rate,
            calibration.alone_read_bandwidth,
            calibration.decode_flop_rate,
            cache,
            end - start,
            calibration.layer_token_seconds,
            calibration.layer_prompt_seconds,
            calibration.layer_step_seconds,
            self.held(quantize).head if last else 0,
            compute,
            calibration.layer_token_seconds_alone,
        )

    def stage_costs(
        self,
        plan: list[StagePlan],
        quantize: dict[str, str | None],  # by device
        calibrations: dict[str, Calibration],  # by device
        computes: Mapping[str, str] | None = None,  # what each device computes on, by device
    ) -> list[StageCost]:
        """Each planned stage's costs on its device."""
        computes = computes or {}
        return [
            self.cost(
                stage.device,
                stage.layer_range,
                quantize.get(stage.device),
                calibrations[stage.device],
                computes.get(stage.device, ""),
            )
            for stage in plan
        ]

    def best_alone(
        self,
        devices: list[tuple[str, int]],  # (name, bytes of memory available)
        quantize: dict[str, str | None],
        calibrations: dict[str, Calibration],
        streams: int,
    ) -> tuple[str, Prediction] | None:
        """The device that would serve fastest holding the whole model by itself; None when none can."""
        whole = LayerRange(0, len(self.weights.layers))
        best: tuple[str, Prediction] | None = None
        for name, memory in devices:
            if self.held(quantize.get(name)).held(*whole) * HEADROOM > memory:
                continue
            prediction = predict(
                [self.cost(name, whole, quantize.get(name), calibrations[name])], [], 0, streams
            )
            if best is None or prediction.one_stream > best[1].one_stream:
                best = (name, prediction)
        return best


def step_balance(
    model: CostModel, calibration: Calibration, quantize: list[str | None], streams: int
) -> StageSeconds:
    """A stage's decode step where every stage computes on a unit of its own and `streams` streams keep a
    micro-batch in flight at each: a step of ceil(streams / stages) tokens (`StageCost.step_seconds`), on
    `calibration`'s figures for every device (the devices' relative speeds divide it in `balance`, as
    they divide bytes). Per token the lm_head weighs what ten layers of a small model weigh; per step of
    many tokens it is one matmul that reads its weights once, where each layer's work per token
    (attention over each sequence's own cache, norms, RoPE) grows with the tokens: balanced per step, the
    last stage takes more layers than balanced per token, and one stream, which passes every stage in
    turn, loses nothing on devices alike."""
    batch = math.ceil(streams / len(quantize))

    def seconds(index: int, start: int, end: int) -> float:
        cost = model.cost("", LayerRange(start, end), quantize[index], calibration)
        return cost.step_seconds(batch, context=MEAN_CONTEXT)

    return seconds


def describe(prediction: Prediction, alone: tuple[str, Prediction] | None, stages: int) -> str:
    """The prediction in a sentence, with the best single device beside it when there are several."""
    text = (
        f"predicted decode: {prediction.one_stream:.1f} tok/s for one stream, "
        f"{prediction.many_streams:.1f} tok/s total for {prediction.streams} streams "
        f"({prediction.many_streams_total:.1f} counting their {prediction.prompt_tokens}-token prompts)"
    )
    if stages < 2 or alone is None:
        return text
    name, single = alone
    text += f"; {name} alone: {single.one_stream:.1f} and {single.many_streams:.1f} tok/s"
    if single.one_stream > prediction.one_stream and single.many_streams > prediction.many_streams:
        text += f" (one device alone would be faster: serve the model on {name} only)"
    return text
