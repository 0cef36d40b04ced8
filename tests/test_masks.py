import torch

from nld_lora.model.masks import causal_mask, draft_mask, dual_stream_mask, ragged_mask


def _causal_ref(valid, q_len):
    b, total = valid.shape
    past = total - q_len
    out = torch.zeros(b, 1, q_len, total, dtype=torch.bool)
    for bi in range(b):
        for i in range(q_len):
            for s in range(total):
                out[bi, 0, i, s] = (bool(valid[bi, s]) and s <= past + i) or s == past + i
    return out


def _draft_ref(valid, q_len):
    b, total = valid.shape
    past = total - q_len
    out = torch.zeros(b, 1, q_len, total, dtype=torch.bool)
    for bi in range(b):
        for i in range(q_len):
            for s in range(total):
                out[bi, 0, i, s] = bool(valid[bi, s]) or s == past + i
    return out


def _dual_ref(length, block):
    out = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for i in range(2 * length):
        for j in range(2 * length):
            qi_noisy, kj_noisy = i < length, j < length
            pi, pj = i % length, j % length
            if qi_noisy and kj_noisy:
                out[i, j] = pi // block == pj // block
            elif qi_noisy and not kj_noisy:
                out[i, j] = pj // block < pi // block
            elif not qi_noisy and not kj_noisy:
                out[i, j] = pj <= pi
    return out


def test_causal_and_draft_masks_match_loops():
    g = torch.Generator().manual_seed(0)
    for past, q in [(0, 5), (3, 1), (4, 4), (7, 3)]:
        valid = torch.rand(3, past + q, generator=g) > 0.3
        assert torch.equal(causal_mask(valid, q), _causal_ref(valid, q))
        assert torch.equal(draft_mask(valid, q), _draft_ref(valid, q))


def test_dual_stream_mask_matches_loops():
    for length, block in [(8, 4), (7, 3), (5, 1), (6, 6)]:
        assert torch.equal(dual_stream_mask(length, block)[0, 0], _dual_ref(length, block))


def test_ragged_mask_equals_a_slot_by_slot_loop():
    """Each row's new tokens sit at slots lengths[b] .. lengths[b] + q - 1: slots below are seen, the block as the
    pattern says, every slot past the block is hidden (stale drafts there are never read)."""
    g = torch.Generator().manual_seed(0)
    for q, window in ((1, 9), (4, 12), (5, 5)):
        pattern = torch.rand(q, q, generator=g) > 0.4
        lengths = torch.randint(0, window - q + 1, (3,), generator=g)
        got = ragged_mask(lengths, window, pattern)
        assert got.shape == (3, 1, q, window)
        for b in range(3):
            for i in range(q):
                for s in range(window):
                    n = int(lengths[b])
                    expected = s < n or (n <= s < n + q and bool(pattern[i, s - n]))
                    assert bool(got[b, 0, i, s]) == expected, (q, b, i, s)
