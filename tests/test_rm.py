import pytest
import torch

from fastrlhf.models import TinyGPT, TinyGPTConfig, ValueModel
from fastrlhf.rm import PreferenceBatch, RewardConfig, RewardTrainer


def reward_model(seed=0):
    torch.manual_seed(seed)
    return ValueModel(TinyGPT(TinyGPTConfig(vocab_size=8, n_layer=1, n_head=2, d_model=16, max_len=8)))


def pairs(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(2, 8, (n, 8), generator=g) for _ in range(2)]
    lengths = [torch.randint(3, 9, (n, 1), generator=g) for _ in range(2)]
    masks = [torch.arange(8)[None] < length for length in lengths]
    return PreferenceBatch(ids[0].masked_fill(~masks[0], 0), masks[0], ids[1].masked_fill(~masks[1], 0), masks[1],
                           margin=torch.rand(n, generator=g, dtype=torch.float32))


def formula(model, batch, cfg):
    """The loss written out in float64 from the model's per-token values and hidden states."""
    def last(values, mask):
        return torch.stack([row[m].double()[-1] for row, m in zip(values, mask)])

    with torch.no_grad():
        values_w, hidden = model(batch.chosen_ids, return_hidden=True)
        r_w, r_l = last(values_w, batch.chosen_mask), last(model(batch.rejected_ids), batch.rejected_mask)
        d = r_w - r_l - batch.margin.double()
        loss = cfg.rank_coef * torch.log1p(torch.exp(-d)).mean() + cfg.center_coef * ((r_w + r_l) ** 2).mean()
        logits = hidden[:, :-1].double() @ model.backbone.output_weight.double().T
        logp = logits.log_softmax(-1).gather(-1, batch.chosen_ids[:, 1:, None])[..., 0]
        logp = torch.cat([torch.zeros(len(logp), 1, dtype=torch.float64), logp], 1)  # token 0 has no prediction
        nll = -logp[batch.chosen_mask].sum() / batch.chosen_mask.sum()
    return loss + cfg.lm_coef * nll, (r_w > r_l).double().mean()


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("coefs", [{}, {"rank_coef": 0.7, "center_coef": 0.3, "lm_coef": 0.5}])
def test_loss_matches_formula(impl, coefs):
    model, batch, cfg = reward_model(), pairs(), RewardConfig(**coefs)
    loss, stats = RewardTrainer(model, cfg, impl=impl).loss(batch)
    expected, accuracy = formula(model, batch, cfg)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert float(stats["accuracy"]) == pytest.approx(float(accuracy))


def test_fused_and_reference_give_the_same_gradients():
    grads = []
    for impl in ("fused", "reference"):
        model = reward_model()
        loss, _ = RewardTrainer(model, RewardConfig(center_coef=0.1, lm_coef=0.5), impl=impl).loss(pairs())
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_learns_a_separable_preference():
    def batch(seed):  # chosen sequences end in token 7, rejected ones in token 6
        b = pairs(64, seed)
        for ids, mask, token in ((b.chosen_ids, b.chosen_mask, 7), (b.rejected_ids, b.rejected_mask, 6)):
            ids.scatter_(1, mask.sum(1, keepdim=True) - 1, token)
        b.margin = None
        return b

    trainer = RewardTrainer(reward_model(), RewardConfig(lr=3e-3))
    heldout = batch(100)
    before = trainer.evaluate(heldout, batch_size=24)
    for step in range(30):
        trainer.train_step(batch(step))
    after = trainer.evaluate(heldout, batch_size=24)
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.95
    assert trainer.evaluate(heldout) == pytest.approx(after)  # chunked evaluation = one batch
