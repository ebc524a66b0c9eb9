"""Sampling on the last stage: greedy, temperature, top-k, top-p, with one seeded generator per sequence.

Engine-neutral (numpy over float32 logits), so a seed gives the same tokens on every layout and engine:
each sampled token draws exactly one uniform number from its sequence's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshllm.step import SampledToken, Segment


@dataclass
class _SequenceState:
    rng: np.random.Generator
    n_sampled: int = 0


def log_normalizer(logits: np.ndarray) -> float:
    """log(sum(exp(logits))), computed without overflow: a token's log-probability is its logit minus it."""
    top = float(np.max(logits))
    return top + float(np.log(np.sum(np.exp(logits - top), dtype=np.float64)))


class Sampler:
    """Per-sequence sampling state, kept until `release`."""

    def __init__(self) -> None:
        self._states: dict[int, _SequenceState] = {}

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._states.pop(seq_id, None)

    @staticmethod
    def _resumed(seed: int | None, sampled: int) -> _SequenceState:
        """A sequence's generator after `sampled` tokens: each drew one number (greedy ones drew none,
        and use none, so drawing them here changes nothing)."""
        rng = np.random.default_rng(seed)
        if sampled:
            rng.random(sampled)
        return _SequenceState(rng, sampled)

    def sample(self, segments: list[Segment], logits: np.ndarray) -> list[SampledToken]:
        """`logits` is `[S, vocab]`, one row per segment; returns a token for each segment with sample=True."""
        tokens = []
        for segment, row in zip(segments, logits, strict=True):
            if segment.sample:
                tokens.append(self._sample_one(segment, row))
        return tokens

    def _sample_one(self, segment: Segment, logits: np.ndarray) -> SampledToken:
        params = segment.sampling
        state = self._states.get(segment.seq_id)
        resumed = segment.sampled is not None and (state is None or state.n_sampled != segment.sampled)
        if state is None or resumed:  # new, or prefilled again after a failure
            state = self._states[segment.seq_id] = self._resumed(params.seed, segment.sampled or 0)
        logits = logits.astype(np.float32, copy=False)
        # reported: the model's own distribution, before any restriction
        normalizer = log_normalizer(logits)
        allowed = logits
        banned = [i for i in params.eos_token_ids if 0 <= i < logits.shape[0]]
        if state.n_sampled < params.min_tokens and banned:
            allowed = logits.copy()
            allowed[banned] = -np.inf
        if params.temperature <= 0:
            token_id = int(np.argmax(allowed))
        else:
            # softmax does not see a constant shift: the logits drawn from need no normalizing
            token_id = _draw(allowed / params.temperature, params.top_k, params.top_p, state.rng)
        state.n_sampled += 1
        return SampledToken(segment.seq_id, token_id, float(np.float64(logits[token_id]) - normalizer))


def _draw(scaled: np.ndarray, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One token from softmax(scaled), restricted to the top_k most likely and to the top_p mass."""
    if 0 < top_k < scaled.shape[0]:
        candidates = np.argpartition(-scaled, top_k - 1)[:top_k]
        candidates = candidates[np.lexsort((candidates, -scaled[candidates]))]  # likeliest first, ties by id
        probs = np.exp(scaled[candidates] - np.max(scaled[candidates]))
        probs /= probs.sum()
    elif top_p < 1.0:
        candidates, probs = _nucleus(scaled, top_p)
    else:
        probs = np.exp(scaled - np.max(scaled))
        candidates = None
    if top_p < 1.0:
        keep = min(int(np.searchsorted(np.cumsum(probs), top_p) + 1), len(probs))  # the smallest prefix
        candidates, probs = candidates[:keep], probs[:keep]  # type: ignore[index]   # with mass >= top_p
    index = _inverse_cdf(probs, rng.random())
    return index if candidates is None else int(candidates[index])


_BLOCK = 1024  # weights summed a block at a time by `_inverse_cdf`


def _inverse_cdf(weights: np.ndarray, uniform: float) -> int:
    """The first index at which the running sum of `weights` (non-negative) passes `uniform` times their
    total. Summed in float64 a block at a time, then within one block: a float64 running sum over a
    whole vocabulary took ~1 ms a token, more than all the rest of a draw."""
    size = weights.shape[0]
    if size <= _BLOCK:
        running = np.cumsum(weights, dtype=np.float64)
        return min(int(np.searchsorted(running, uniform * running[-1], side="right")), size - 1)
    whole = size // _BLOCK * _BLOCK
    sums = weights[:whole].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
    if whole < size:  # the last, shorter block
        sums = np.append(sums, weights[whole:].sum(dtype=np.float64))
    blocks = np.cumsum(sums)
    target = uniform * blocks[-1]
    block = min(int(np.searchsorted(blocks, target, side="right")), len(blocks) - 1)
    start = block * _BLOCK
    inside = np.cumsum(weights[start : start + _BLOCK], dtype=np.float64) + (
        blocks[block - 1] if block else 0.0
    )
    offset = min(int(np.searchsorted(inside, target, side="right")), len(inside) - 1)
    return min(start + offset, size - 1)


def _nucleus(scaled: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The likeliest tokens, likeliest first (ties by id), enough of them to hold `top_p` of the mass,
    and their probabilities. Sorting the whole vocabulary (151,936 tokens for Qwen3) took ~15 ms a token;
    only the tokens above a falling cut-off are sorted, the cut-off lowered until they hold the mass."""
    weights = np.exp(scaled - np.max(scaled))  # the likeliest is 1
    total = float(np.sum(weights, dtype=np.float64))
    cut = 1.0
    while True:
        cut /= 16.0
        chosen = np.flatnonzero(weights >= cut)  # every tie of the cut-off included
        if cut == 0.0 or float(np.sum(weights[chosen], dtype=np.float64)) >= top_p * total:
            break
    chosen = chosen[np.argsort(-weights[chosen], kind="stable")]
    return chosen, weights[chosen] / total
