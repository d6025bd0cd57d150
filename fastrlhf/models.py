"""Models for the trainers: a tiny built-in causal LM, a scalar-head value/reward model, and an adapter
for Hugging Face causal LMs (only when ``transformers`` is installed).

Every language model here exposes the same two things, so log-probs come from
``linear_logprobs(hidden, output_weight, labels)`` and the ``[B, T, V]`` logits never exist:

- ``model(input_ids) -> hidden`` (``[B, T, H]``, the states the LM head reads), and
- ``model.output_weight`` (``[V, H]``, the LM head's weight as ``nn.Linear`` stores it).

Sequences are right-padded: attention is causal, so pads after a sequence's last token change nothing
at its real tokens and no attention mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyGPTConfig:
    vocab_size: int = 16
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    max_len: int = 32
    dropout: float = 0.0


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        width = 4 * cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, width), nn.GELU(), nn.Linear(width, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.drop.p if self.training else 0.0)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    """GPT-style causal LM: token + learned position embeddings, ``n_layer`` blocks, final LayerNorm.

    ``forward(input_ids [B, T] int64) -> hidden [B, T, d_model]``; the untied LM head is ``lm_head``.
    """

    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.hidden_size = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(_init)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"input_ids: expected at most max_len={self.cfg.max_len} positions, got {T}")
        x = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def _init(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class ValueModel(nn.Module):
    """A causal LM backbone plus a scalar head: ``forward(input_ids) -> values [B, T]`` (fp32).

    The reward model reads the value at a sequence's last token; the PPO critic reads every position.
    ``backbone.output_weight`` stays available for the reward model's optional imitation (LM) term.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, return_hidden: bool = False):
        hidden = self.backbone(input_ids)
        values = self.head(hidden).squeeze(-1).float()
        return (values, hidden) if return_hidden else values


class HFCausalLM(nn.Module):
    """Adapter for a Hugging Face ``AutoModelForCausalLM``: ``forward`` returns the last hidden states
    from the base model (the LM head is not run), ``output_weight`` is the LM head's weight."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.hidden_size = model.config.hidden_size

    @classmethod
    def from_pretrained(cls, name: str, **kwargs) -> "HFCausalLM":
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as error:
            raise ImportError("HFCausalLM needs transformers: pip install transformers") from error
        return cls(AutoModelForCausalLM.from_pretrained(name, **kwargs))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.base_model(input_ids=input_ids).last_hidden_state


def as_causal_lm(model: nn.Module) -> nn.Module:
    """``model`` itself when it has ``output_weight``; a Hugging Face causal LM wrapped in ``HFCausalLM``."""
    if hasattr(model, "output_weight"):
        return model
    if hasattr(model, "get_output_embeddings") and hasattr(model, "base_model"):
        return HFCausalLM(model)
    raise TypeError(f"model: expected a TinyGPT, an HFCausalLM or a transformers causal LM, got {type(model).__name__}")


def freeze_unread_lm_head(model: ValueModel) -> None:
    """Stops training a value model's LM head, which its values never read (DDP needs every trained
    parameter to get a gradient); a head tied to the input embedding is read, and stays trainable."""
    weight = model.backbone.output_weight
    if sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) == 1:
        weight.requires_grad_(False)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Sets every ``nn.Dropout`` to p = 0 and the model to eval mode (where Hugging Face attention skips
    its dropout): RL needs the sampling and the training forward passes to be the same function."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.eval()
