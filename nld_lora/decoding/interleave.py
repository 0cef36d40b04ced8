"""Speed comparisons that machine drift cannot decide: every configuration decodes the same batch of prompts, one
after another, before the next batch starts.

Timing whole prompt sets one after another lets a slow spell of a shared machine land on one configuration;
interleaving per decode batch spreads it over all of them. The starting configuration rotates from batch to batch and
rounds continue the rotation (`start`), so no configuration always runs first or last.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
P = TypeVar("P")


def interleaved(prompts: Sequence[P], runners: dict[K, Callable[[list[P]], T]],
                batch_size: int, start: int = 0) -> dict[K, list[T]]:
    """One round: each runner's results on consecutive batches of `batch_size` prompts (label -> one result per
    batch, in prompt order); every runner decodes a batch before any runner starts the next one. Batch i starts
    with runner (start + i) mod the number of runners; round r of a measurement passes start = r * its batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    labels = list(runners)
    results: dict[K, list[T]] = {label: [] for label in labels}
    for i, first in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[first:first + batch_size])
        shift = (start + i) % len(labels) if labels else 0
        for label in labels[shift:] + labels[:shift]:
            results[label].append(runners[label](chunk))
    return results
