import pytest
import torch

from fastrlhf.models import HFCausalLM, TinyGPT, TinyGPTConfig, ValueModel, disable_dropout
from fastrlhf.sampling import generate, response_mask

EOS, PAD = 1, 0


def tiny(**kwargs):
    torch.manual_seed(0)
    settings = {"vocab_size": 8, "n_layer": 1, "n_head": 2, "d_model": 16, "max_len": 12, **kwargs}
    return TinyGPT(TinyGPTConfig(**settings))


def test_tiny_gpt_is_causal():
    model = tiny()
    ids = torch.randint(2, 8, (3, 10))
    changed = ids.clone()
    changed[:, 6:] = PAD  # right padding after position 5 changes nothing before it
    assert model(ids).shape == (3, 10, 16)
    torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])
    assert not torch.allclose(model(ids)[:, 6:], model(changed)[:, 6:])


def test_tiny_gpt_rejects_too_long_input():
    with pytest.raises(ValueError, match="max_len=12"):
        tiny()(torch.zeros(1, 13, dtype=torch.long))


def test_value_model_gives_one_fp32_value_per_token():
    values, hidden = ValueModel(tiny()).forward(torch.randint(0, 8, (2, 5)), return_hidden=True)
    assert values.shape == (2, 5) and values.dtype == torch.float32 and hidden.shape == (2, 5, 16)


def test_disable_dropout():
    model = tiny(dropout=0.5).train()
    disable_dropout(model)
    assert not model.training
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_response_mask_stops_after_first_eos():
    responses = torch.tensor([[3, 4, EOS, PAD, PAD], [3, 3, 3, 3, 3], [EOS, PAD, PAD, PAD, PAD]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask(responses, EOS), expected)


def test_generate_pads_after_eos_and_top_1_is_greedy():
    model = tiny()
    prompts = torch.randint(2, 8, (16, 3))
    responses, mask = generate(model, prompts, max_new_tokens=6, eos_id=EOS, pad_id=PAD,
                               generator=torch.Generator().manual_seed(0))
    assert responses.shape == (16, 6) and torch.equal(mask, response_mask(responses, EOS))
    assert bool((responses[~mask] == PAD).all()) and bool((responses[mask] != PAD).any())

    greedy, _ = generate(model, prompts, max_new_tokens=4, eos_id=EOS, pad_id=PAD, top_k=1)
    ids = prompts
    for _ in range(4):
        ids = torch.cat([ids, (model(ids)[:, -1] @ model.output_weight.T).argmax(-1, keepdim=True)], 1)
    expected = ids[:, 3:].masked_fill(~response_mask(ids[:, 3:], EOS), PAD)
    assert torch.equal(greedy, expected)


def test_generate_rejects_eos_equal_to_pad():
    with pytest.raises(ValueError, match="eos_id and pad_id"):
        generate(tiny(), torch.zeros(1, 2, dtype=torch.long), max_new_tokens=2, eos_id=1, pad_id=1)


def test_hf_causal_lm_adapter():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=11, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = disable_dropout(HFCausalLM(transformers.GPT2LMHeadModel(config)))
    ids = torch.randint(0, 11, (2, 5))
    logits = model.model(ids).logits
    torch.testing.assert_close(model(ids) @ model.output_weight.T, logits)
