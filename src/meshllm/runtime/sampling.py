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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


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
        logits = logits.astype(np.float32, copy=True)
        logprobs = log_softmax(logits)  # reported: the model's own distribution, before any restriction
        allowed = logprobs
        banned = [i for i in params.eos_token_ids if 0 <= i < logits.shape[0]]
        if state.n_sampled < params.min_tokens and banned:
            logits[banned] = -np.inf
            allowed = log_softmax(logits)
        if params.temperature <= 0:
            token_id = int(np.argmax(logits))
        else:
            token_id = _draw(allowed / params.temperature, params.top_k, params.top_p, state.rng)
        state.n_sampled += 1
        return SampledToken(segment.seq_id, token_id, float(logprobs[token_id]))


def _draw(scaled: np.ndarray, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One token from softmax(scaled), restricted to the top_k most likely and to the top_p mass."""
    candidates = np.arange(scaled.shape[0])
    if 0 < top_k < scaled.shape[0]:
        candidates = np.argpartition(-scaled, top_k - 1)[:top_k]
    if top_p < 1.0 or top_k > 0:
        candidates = candidates[np.argsort(-scaled[candidates], kind="stable")]
    probs = np.exp(scaled[candidates] - np.max(scaled[candidates]))
    probs /= probs.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)  # smallest prefix with mass >= top_p
        candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(candidates[min(index, len(candidates) - 1)])
