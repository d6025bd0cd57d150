"""causal_lm_logprobs on a tiny randomly initialised causal LM: the same log-probs, entropies and parameter
gradients as the model's own logits give, without the logits."""

import pytest
import torch

import fastrlhf
from fastrlhf.integrations.transformers import causal_lm_logprobs

transformers = pytest.importorskip("transformers", reason="transformers is not installed: "
                                   ".ci/install-integrations")

B, T, V = 3, 12, 301


def tiny(config_class, model_class, **sizes):
    torch.manual_seed(0)
    return model_class(config_class(vocab_size=V, **sizes)).eval()


MODELS = {
    "llama": lambda: tiny(transformers.LlamaConfig, transformers.LlamaForCausalLM, hidden_size=32,
                          intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": lambda: tiny(transformers.GPT2Config, transformers.GPT2LMHeadModel, n_embd=32, n_layer=2, n_head=4,
                         n_positions=64),
}


def batch(left_padding: bool):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([T, T - 3, T - 7])
    real = torch.arange(T) < lengths[:, None]
    attention_mask = (real.flip(1) if left_padding else real).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100  # the prompt is not scored
    return input_ids, attention_mask, labels


def through_logits(model, input_ids, attention_mask, labels, temperature):
    """The definition: log_softmax of the model's logits at t, at the label of t + 1."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float() / temperature
    targets = labels[:, 1:]
    scored = (targets != -100) & (attention_mask[:, 1:] != 0)
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    return logp.where(scored, 0.0), entropy.where(scored, 0.0)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("left_padding", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_same_as_through_the_logits(name, left_padding, temperature):
    model = MODELS[name]()
    inputs = batch(left_padding)
    got = causal_lm_logprobs(model, *inputs, temperature=temperature, return_entropy=True)
    got_grads = grads(model, got)
    want = through_logits(model, *inputs, temperature)
    want_grads = grads(model, want)
    for g, w in zip(got, want):
        assert g.shape == (B, T - 1) and g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for name_, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name_], rtol=1e-4, atol=1e-5, msg=name_)
    only_logp = causal_lm_logprobs(model, *inputs, temperature=temperature)
    torch.testing.assert_close(only_logp, want[0], rtol=1e-5, atol=1e-5)


def grads(model, outputs):
    """Gradients of every parameter under a fixed random upstream gradient on each output."""
    model.zero_grad()
    g = torch.Generator().manual_seed(2)
    sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_never_calls_the_head_module(monkeypatch):
    model = MODELS["llama"]()
    seen = []
    model.lm_head.register_forward_hook(lambda *args: seen.append("logits"))
    causal_lm_logprobs(model, *batch(False))
    assert not seen


def test_unmasked_without_attention_mask():
    model = MODELS["gpt2"]()
    input_ids, _, _ = batch(False)
    got = causal_lm_logprobs(model, input_ids, None, input_ids)
    want, _ = through_logits(model, input_ids, torch.ones_like(input_ids), input_ids, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert bool((got < 0).all())


def test_bad_arguments():
    model = MODELS["llama"]()
    input_ids, attention_mask, labels = batch(False)
    with pytest.raises(ValueError, match="labels: expected shape"):
        causal_lm_logprobs(model, input_ids, attention_mask, labels[:, 1:])
    with pytest.raises(TypeError, match="input_ids: expected dtype"):
        causal_lm_logprobs(model, input_ids.float(), attention_mask, labels)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        causal_lm_logprobs(model, input_ids, attention_mask, labels)


def test_linear_logprobs_is_what_runs(monkeypatch):
    calls = []
    real = fastrlhf.linear_logprobs
    monkeypatch.setattr(fastrlhf, "linear_logprobs", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    input_ids, attention_mask, labels = batch(False)
    causal_lm_logprobs(MODELS["llama"](), input_ids, attention_mask, labels)
    assert calls == [(int(((labels[:, 1:] != -100) & (attention_mask[:, 1:] != 0)).sum()), 32)]
