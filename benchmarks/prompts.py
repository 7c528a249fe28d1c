"""Deterministic token-id prompts, identical for every engine."""

import random


def random_prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    """``length`` token ids drawn from ``[10, vocab_size)`` (low ids are often special)."""
    rng = random.Random(seed)
    return [rng.randrange(10, vocab_size) for _ in range(length)]


def spread_lengths(count: int, shortest: int, longest: int) -> list[int]:
    """``count`` prompt lengths spread evenly over ``[shortest, longest]``."""
    if count == 1:
        return [longest]
    step = (longest - shortest) / (count - 1)
    return [round(shortest + i * step) for i in range(count)]


def batch_prompts(count: int, shortest: int, longest: int, vocab_size: int) -> list[list[int]]:
    lengths = spread_lengths(count, shortest, longest)
    return [random_prompt(n, vocab_size, seed=1000 + i) for i, n in enumerate(lengths)]
