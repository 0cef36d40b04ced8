"""Triton verify kernels (run under TRITON_INTERPRET=1 on CPU) against the PyTorch references."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nld_lora.kernels import batched, reference, set_backend, triton_verify, verify_greedy
from nld_lora.kernels.triton_verify import BLOCK_V

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# compiled kernels on a GPU when TRITON_INTERPRET=0 (scripts/gpu_check.sh); the interpreter on CPU otherwise
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"
VOCABS = [BLOCK_V - 1, BLOCK_V + 1, 1000, 32000, 131072]


def _case(vocab, counts, dtype, seed, style):
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts) + len(counts)
    if style == "ties":
        logits = torch.randint(0, 3, (rows, vocab), generator=g).float()
    elif style == "equal":
        logits = torch.zeros(rows, vocab)
    else:
        logits = torch.randn(rows, vocab, generator=g) * 3
    if style == "neg_inf_tail":
        logits[:, vocab // 2:] = float("-inf")
    logits = logits.to(dtype)
    cu = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    am = logits.float().argmax(-1)
    drafts = []
    for i, k in enumerate(counts):
        d = am[int(cu[i]) + i: int(cu[i]) + i + k].clone()
        if k:
            cut = int(torch.randint(0, k + 1, (1,), generator=g))
            if cut < k:
                d[cut] = (d[cut] + 1) % vocab
        drafts.append(d)
    drafts = torch.cat(drafts) if drafts else torch.zeros(0, dtype=torch.long)
    return logits.to(DEVICE), drafts.to(DEVICE), cu.to(DEVICE)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vocab=st.sampled_from(VOCABS[:3]),
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 10_000),
    style=st.sampled_from(["random", "ties", "equal", "neg_inf_tail"]),
)
def test_greedy_triton_equals_reference(vocab, counts, dtype, seed, style):
    logits, drafts, cu = _case(vocab, counts, dtype, seed, style)
    ref = reference.verify_greedy(logits, drafts, cu)
    tri = triton_verify.verify_greedy(logits, drafts, cu)
    assert torch.equal(ref[0], tri[0]) and torch.equal(ref[1], tri[1])
    assert int(ref[0].max()) < vocab


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vocab=st.sampled_from(VOCABS[:3]),
    k=st.integers(0, 8),
    n=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 10_000),
    style=st.sampled_from(["random", "ties", "equal", "neg_inf_tail"]),
)
def test_batched_greedy_equals_reference(vocab, k, n, dtype, seed, style):
    """The runtime's non-CUDA path (one draft length per cycle, host offsets) against the per-request reference."""
    logits, drafts, cu = _case(vocab, [k] * n, dtype, seed, style)
    host = cu.tolist()
    ref = reference.verify_greedy(logits, drafts, host)
    fast = batched.verify_greedy(logits, drafts, host)
    assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])
    assert all(torch.equal(a, b) for a, b in zip(verify_greedy(logits, drafts, host), ref))  # the dispatcher's pick
    assert batched.uniform_draft_len(host) == k and batched.uniform_draft_len(cu) is None
    if n > 1 and k:
        with pytest.raises(ValueError, match="equal draft lengths"):
            batched.verify_greedy(logits[:-1], drafts[:-1], host[:-1] + [host[-1] - 1])


@pytest.mark.parametrize("vocab", VOCABS[3:])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_large_vocab(vocab, dtype):
    logits, drafts, cu = _case(vocab, [4, 0, 2], dtype, 7, "random")
    logits[0, vocab - 1] = 100.0  # the winner sits in the ragged last chunk
    ref = reference.verify_greedy(logits, drafts, cu)
    tri = triton_verify.verify_greedy(logits, drafts, cu)
    assert torch.equal(ref[0], tri[0]) and torch.equal(ref[1], tri[1])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vocab=st.sampled_from([5, BLOCK_V - 1, BLOCK_V + 1, 1000]),
    counts=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 10_000),
    temps=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=4, max_size=4),
)
def test_sampled_replay_equals_reference(vocab, counts, dtype, seed, temps):
    logits, drafts, cu = _case(vocab, counts, dtype, seed, "random")
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(sum(counts), vocab, generator=g).to(DEVICE)
    draft_logits = (logits.float()[: sum(counts)] + noise).to(dtype)
    temperature = torch.tensor(temps[: len(counts)] + [1.0] * (len(counts) - len(temps[: len(counts)])), device=DEVICE)
    seeds = torch.arange(len(counts), dtype=torch.int64, device=DEVICE) * 977 + seed
    ref = reference.verify_sampled(logits, draft_logits, drafts, cu, temperature, seeds)
    tri = triton_verify.verify_sampled(logits, draft_logits, drafts, cu, temperature, seeds)
    assert torch.equal(ref[0], tri[0]) and torch.equal(ref[1], tri[1])


@pytest.mark.parametrize("q_style", ["uniform", "peaked_wrong", "close"])
def test_sampled_emits_target_distribution(q_style):
    """Draft d ~ q, one verify row pair per request; the first emitted token must follow p.
    5 tokens, 3000 trials: TV expected ~0.02; bound 0.05. Run on the reference: the replay test above proves the
    Triton kernel emits the very same tokens (the interpreter is too slow for 3000 programs in CI)."""
    vocab, n = 5, 3000
    p_logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    q_logits = {"uniform": torch.zeros(vocab), "peaked_wrong": torch.tensor([-2.0, 0.0, 3.0, 1.0, 0.0]),
                "close": p_logits + 0.3 * torch.randn(vocab, generator=torch.Generator().manual_seed(0))}[q_style]
    g = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(q_logits.softmax(-1), n, replacement=True, generator=g)
    target = torch.stack([p_logits, p_logits] * n)  # row 0 judges the draft, row 1 is the bonus row
    cu = torch.arange(n + 1, dtype=torch.int32)
    tokens, accepted = reference.verify_sampled(
        target, q_logits.expand(n, vocab).contiguous(), drafts, cu, torch.ones(n), torch.arange(n) + 12345)
    first = torch.bincount(tokens[:, 0].long(), minlength=vocab).float() / n
    tv = 0.5 * float((first - p_logits.softmax(-1)).abs().sum())
    assert tv < 0.05, (q_style, tv)
    assert 0 < int(accepted.sum()) < n or q_style == "close"


def test_bad_input_is_rejected_clearly():
    def on_device(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=DEVICE)

    logits = torch.randn(5, 10, device=DEVICE)
    with pytest.raises(ValueError, match="expected sum"):
        verify_greedy(logits, on_device([1, 2]), on_device([0, 2], torch.int32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        verify_greedy(logits, on_device([1, 2, 3, 11]), on_device([0, 4], torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        verify_greedy(torch.randn(3, 10, device=DEVICE), on_device([1]), on_device([0, 2, 1], torch.int32))
    wide = torch.randn(10, 5, device=DEVICE).t()  # non-contiguous rows: handled by copying
    drafts = on_device([1, 2, 3, 4])
    cu = on_device([0, 4], torch.int32)
    ref = reference.verify_greedy(wide.contiguous(), drafts, cu)
    tri = triton_verify.verify_greedy(wide, drafts, cu)
    assert torch.equal(ref[0], tri[0])


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA tensor beside a CPU one")
def test_inputs_on_two_devices_are_rejected():
    logits = torch.randn(5, 10, device="cuda")
    with pytest.raises(ValueError, match="draft_tokens is on cpu"):
        verify_greedy(logits, torch.tensor([1, 2, 3]), torch.tensor([0, 3], dtype=torch.int32, device="cuda"))


def test_dispatcher_override():
    logits, drafts, cu = _case(50, [2, 3], torch.float32, 3, "random")
    set_backend("triton")
    try:
        tri = verify_greedy(logits, drafts, cu)
    finally:
        set_backend("auto")
    assert torch.equal(tri[0], reference.verify_greedy(logits, drafts, cu)[0])
    with pytest.raises(ValueError, match="verify backend"):
        set_backend("cuda-magic")


def test_host_offsets_give_the_same_results_without_reading_the_device(monkeypatch):
    """The runtime passes its draft offsets as a host list: same tokens, and validation copies nothing back."""
    logits, drafts, cu = _case(1000, [3, 0, 5, 2], torch.float32, 11, "random")
    host = cu.tolist()
    temps = torch.tensor([0.0, 0.7, 1.0, 0.5], device=DEVICE)
    seeds = torch.arange(4, dtype=torch.int64, device=DEVICE)
    draft_logits = torch.randn(int(cu[-1]), 1000, device=DEVICE)
    for impl in (reference, triton_verify):
        assert all(torch.equal(a, b) for a, b in zip(impl.verify_greedy(logits, drafts, cu),
                                                     impl.verify_greedy(logits, drafts, host)))
        assert all(torch.equal(a, b) for a, b in
                   zip(impl.verify_sampled(logits, draft_logits, drafts, cu, temps, seeds),
                       impl.verify_sampled(logits, draft_logits, drafts, host, temps, seeds)))
    uniform_logits, uniform_drafts, uniform_cu = _case(1000, [4, 4, 4], torch.float32, 12, "random")
    assert all(torch.equal(a, b) for a, b in  # equal draft lengths: offsets made on the device, no copy
               zip(triton_verify.verify_greedy(uniform_logits, uniform_drafts, uniform_cu),
                   triton_verify.verify_greedy(uniform_logits, uniform_drafts, uniform_cu.tolist())))
    from nld_lora.kernels.validate import check_verify_inputs

    def no_readback(*_args, **_kwargs):
        raise AssertionError("a device-to-host copy during validation")

    monkeypatch.setattr(torch.Tensor, "tolist", no_readback)
    monkeypatch.setattr(torch.Tensor, "item", no_readback)
    assert check_verify_inputs(logits, drafts, host) == host
    with pytest.raises(ValueError, match="expected sum"):
        check_verify_inputs(logits, drafts, host[:-1])
