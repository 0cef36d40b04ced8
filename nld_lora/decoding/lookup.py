"""Prompt-lookup (n-gram) drafts: tokens that followed an earlier occurrence of the context's last n tokens.

They cost no forward. Greedy verification keeps the output exactly AR's whatever the draft, so a lookup draft is
always safe to verify; it pays when the text repeats itself (code, quoting the prompt).
"""

from __future__ import annotations


class NgramIndex:
    """For every n-gram (n <= max_ngram) of a growing token list, where its latest occurrence was followed: a draft
    costs O(max_ngram) dictionary lookups, and each new token O(max_ngram) updates, whatever the context length."""

    def __init__(self, tokens: list[int], max_ngram: int):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.follower: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token after its latest occurrence
        self.extend(tokens)

    def extend(self, new: list[int]) -> None:
        tokens = self.tokens
        for token in new:
            i = len(tokens)
            for n in range(1, min(self.max_ngram, i) + 1):
                self.follower[tuple(tokens[i - n:i])] = i
            tokens.append(token)

    def draft(self, k: int, min_ngram: int = 1) -> list[int]:
        """Up to k tokens after the latest earlier match of the longest suffix n-gram (max_ngram down to min_ngram)."""
        return self.match(k, min_ngram)[1]

    def match(self, k: int, min_ngram: int = 1) -> tuple[int, list[int]]:
        """(n, draft): the length of the longest suffix n-gram with an earlier occurrence and up to k tokens after
        its latest one; (0, []) when none has. Longer matches are right more often (the planner prices them apart)."""
        tokens = self.tokens
        for n in range(min(self.max_ngram, len(tokens) - 1), min_ngram - 1, -1):
            at = self.follower.get(tuple(tokens[len(tokens) - n:]))
            if at is not None:
                return n, tokens[at:at + k]
        return 0, []
