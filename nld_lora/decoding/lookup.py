"""Prompt-lookup (n-gram) drafts: tokens that followed an earlier occurrence of the context's last n tokens.

They cost no forward. Greedy verification keeps the output exactly AR's whatever the draft, so a lookup draft is
always safe to verify; it pays when the text repeats itself (code, quoting the prompt).
"""

from __future__ import annotations


def ngram_draft(context: list[int], max_ngram: int, k: int, min_ngram: int = 1) -> list[int]:
    """Up to k tokens after the latest earlier match of the longest suffix n-gram (max_ngram down to min_ngram)."""
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        pattern = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == pattern:
                follow = context[start + n:start + n + k]
                if follow:
                    return follow
    return []
