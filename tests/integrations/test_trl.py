"""fastrlhf.integrations.trl: TRL's own functions give the same results before and after patch()."""

import pytest
import torch

from fastrlhf.integrations import trl as integration

trl_utils = pytest.importorskip("trl.trainer.utils",
                                reason="trl is not installed: .ci/install-integrations")


def inputs(dtype, shape=(3, 17), V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, V, generator=g)).to(dtype)
    index = torch.randint(0, V, shape, generator=g)
    row_mask = (torch.rand(shape, generator=g) > 0.3).long()
    return logits, index, row_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax(matches_original, dtype, temperature):
    logits, index, row_mask = inputs(dtype)
    matches_original(lambda x, i: trl_utils.selective_log_softmax(x, i, temperature), integration.patch,
                     (logits, index))
    matches_original(lambda x, i, m: trl_utils.selective_log_softmax(x, i, temperature, m), integration.patch,
                     (logits, index, row_mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy(matches_original, dtype):
    logits, _, _ = inputs(dtype, seed=1)
    matches_original(lambda x: trl_utils.entropy_from_logits(x), integration.patch, (logits,))


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_log_softmax_and_entropy(matches_original, entropy_requires_grad):
    logits, index, row_mask = inputs(torch.float32, seed=2)
    call = lambda x, i, m: trl_utils.selective_log_softmax_and_entropy(  # noqa: E731
        x, i, entropy_requires_grad, 0.8, m)
    matches_original(call, integration.patch, (logits, index, row_mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_match_dtype(dtypes_match, dtype):
    logits, index, row_mask = inputs(dtype, seed=3)
    dtypes_match(lambda x, i, m: trl_utils.selective_log_softmax(x, i, 0.9, m), integration.patch,
                 (logits, index, row_mask))
    dtypes_match(lambda x: trl_utils.entropy_from_logits(x), integration.patch, (logits,))
    dtypes_match(lambda x, i, m: trl_utils.selective_log_softmax_and_entropy(x, i, False, 0.9, m),
                 integration.patch, (logits, index, row_mask))


def test_match_dtype_follows_trls_kernel_path(monkeypatch):
    """Where TRL's own test sends the inputs to its Triton kernel, TRL returns fp32."""
    logits, index, _ = inputs(torch.bfloat16, seed=4)
    monkeypatch.setattr(trl_utils, "is_triton_available", lambda: True)
    monkeypatch.setattr(trl_utils, "_supports_trl_loss_kernel", lambda *args: True)
    with integration.patch(match_dtype=True):
        assert trl_utils.selective_log_softmax(logits, index).dtype == torch.float32
        assert trl_utils.entropy_from_logits(logits).dtype == torch.float32


def test_uncovered_forms_go_to_trl():
    logits, _, _ = inputs(torch.float32)
    top_k = logits.topk(3, dim=-1).indices  # index of shape (..., K)
    with integration.patch():
        torch.testing.assert_close(trl_utils.selective_log_softmax(logits, top_k),
                                   logits.log_softmax(-1).gather(-1, top_k))
        with pytest.raises(ValueError, match="temperature must be positive"):
            trl_utils.selective_log_softmax(logits, top_k[..., 0], 0.0)


def test_every_holder_is_rebound_and_restored():
    from trl.experimental.cpo import cpo_trainer  # did `from ...trainer.utils import selective_log_softmax`

    names = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
    originals = {name: getattr(trl_utils, name) for name in names}
    with integration.patch() as handle:
        assert cpo_trainer.selective_log_softmax is trl_utils.selective_log_softmax
        assert all(getattr(trl_utils, name) is not original for name, original in originals.items())
        assert handle.replaced and "active" in repr(handle)
    assert cpo_trainer.selective_log_softmax is originals["selective_log_softmax"]
    assert all(getattr(trl_utils, name) is original for name, original in originals.items())


def tiny_llama(**head):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    trl_utils.add_fused_lm_head(model, **head)
    return model


def fused_head_outputs(model, names):
    """The fused head's outputs on a right-padded batch, and every parameter's gradient under them."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 301, (3, 12), generator=g)
    attention_mask = (torch.arange(12) < torch.tensor([[12], [9], [5]])).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    model.zero_grad()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    values = [getattr(out, name) for name in names]
    differentiable = [v for v in values if v.requires_grad]  # TRL's metrics outputs have no gradient
    if differentiable:
        sum((v * torch.randn(v.shape, generator=g)).sum() for v in differentiable).backward()
    return [v.detach() for v in values], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
def test_fused_lm_head(outputs):
    model = tiny_llama(temperature=0.7, outputs=outputs)
    before = fused_head_outputs(model, outputs)
    with integration.patch():
        after = fused_head_outputs(model, outputs)
    for got, want in zip(after[0], before[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in after[1].items():
        torch.testing.assert_close(grad, before[1][name], rtol=1e-4, atol=1e-6, msg=name)


def head(dtype=torch.float32, N=40, H=16, V=301, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g).to(dtype), (torch.randn(V, H, generator=g) / H**0.5).to(dtype),
            torch.randint(0, V, (N,), generator=g))


def test_chunked_logprob_defaults_to_every_output(monkeypatch):
    """TRL 1.16's default ``outputs`` is every optional output: a call without it gets all five from fastrlhf
    (the last three from the same pass over the logits), as TRL's own function gives them, with the same
    gradients; TRL's kernel never runs."""
    import trl.kernels.chunked_logprob as trl_kernel
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight, targets = head()
    targets[3] = (hidden[3] @ weight.T).argmax()  # at least one top-1 label
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    want = ChunkedLogProbFunction.apply(*leaves, None, targets, 0.7, 64)
    want_grads = torch.autograd.grad(want[0].sum() + want[1].sum(), leaves)
    monkeypatch.setattr(trl_kernel, "_forward_tile", None)  # TRL's own fold, which must not run
    with integration.patch():
        got = ChunkedLogProbFunction.apply(*leaves, None, targets, 0.7, 64)
        got_grads = torch.autograd.grad(got[0].sum() + got[1].sum(), leaves)
    assert len(got) == 5 and all(x is not None for x in got)
    for name, x, y in zip(("log_probs", *integration.CHUNKED_OUTPUTS), got, want):
        assert x.dtype == y.dtype, name
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)
    assert got[4].any()
    for x, y in zip(got_grads, want_grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("outputs", [("log_probs", "is_top1"), ("log_probs", "mean_logits", "log_sum_sq_probs")])
def test_chunked_logprob_returns_none_for_outputs_not_asked(outputs):
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight, targets = head()
    want = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.7, 64, None, 1.0, outputs)
    with integration.patch():
        got = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.7, 64, None, 1.0, outputs)
    for x, y in zip(got, want):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [7, 64, 4096])
def test_chunked_logprob_accepts_trls_chunk_size(matches_original, chunk_size):
    """``chunk_size`` is TRL's vocab tile width; fastrlhf tiles on its own, with the same results."""
    from trl.kernels import ChunkedLogProbFunction

    call = lambda h, w, t: ChunkedLogProbFunction.apply(  # noqa: E731
        h, w, None, t, 0.7, chunk_size, None, 1.0, ("log_probs", "entropy"))[:2]
    matches_original(call, integration.patch, head())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_logprob_match_dtype(dtypes_match, dtype):
    from trl.kernels import ChunkedLogProbFunction

    call = lambda h, w, t: ChunkedLogProbFunction.apply(  # noqa: E731
        h, w, None, t, 1.0, 64, None, 1.0, ("log_probs", "entropy"))
    dtypes_match(call, integration.patch, head(dtype))


def test_fused_lm_head_uses_linear_logprobs_only_where_it_covers(monkeypatch):
    import fastrlhf

    calls = []
    real = fastrlhf.linear_logprobs
    monkeypatch.setattr(fastrlhf, "linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    with integration.patch():
        fused_head_outputs(tiny_llama(outputs=("log_probs", "entropy")), ("log_probs",))
        assert calls == [1]
        mean_logits, _ = fused_head_outputs(tiny_llama(outputs=("log_probs", "mean_logits")), ("mean_logits",))
        assert calls == [1, 1] and mean_logits[0].abs().sum() > 0  # the extras come from fastrlhf too
        from trl.kernels import ChunkedLogProbFunction

        hidden, weight, targets = head()
        ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.7, 64, 30.0)
        assert calls == [1, 1]  # soft-capped logits: TRL's kernel
