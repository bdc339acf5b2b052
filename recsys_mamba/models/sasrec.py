"""SASRec: causal self-attention over the event sequence, the attention baseline.

Learned positional embeddings, pre-norm blocks (LayerNorm -> causal attention -> dropout ->
residual; LayerNorm -> GELU feed-forward -> dropout -> residual), a final LayerNorm. Attention goes
through `scaled_dot_product_attention`. Streaming uses a key/value cache that grows with history.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.base import Dropout, FeedForward, SequenceEncoder, State, select


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise RecsysError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.dropout = dropout
        self.attn_dropout = Dropout(dropout)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(
        self, x: Tensor, past: tuple[Tensor, Tensor] | None = None, visible: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, L, d) -> (B, L, d) and this call's keys/values (B, H, T, d/H) for a cache.

        Full sequences use the causal mask alone: items are right-padded, so every key a real
        query can see is real, and padded queries' outputs are zeroed by the encoder. With `past`
        (one new event per row), `visible` (B, T) marks the cached keys that are real events.
        """
        B, L, d = x.shape
        q, k, v = (
            t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2) for t in self.qkv(x).split(d, -1)
        )
        if past is None and self.training and self.dropout > 0 and x.device.type == "cpu":
            # With dropout, CPU SDPA takes its math path anyway (the (L, L) weights materialised) and
            # draws the mask with bernoulli_, 28% of a training step at L = 200. The same attention
            # spelled out, with the cheap mask of our Dropout, keeps the baseline's timings fair.
            scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
            y = self.attn_dropout(scores.masked_fill(causal, float("-inf")).softmax(-1)) @ v
        elif past is None:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])
        return self.out_proj(y.transpose(1, 2).reshape(B, L, d)), (k, v)


class SASRecBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float, ffn: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model) if ffn else None
        self.ffn = FeedForward(d_model, ffn_mult, dropout) if ffn else None
        self.dropout = Dropout(dropout)

    def forward(
        self, h: Tensor, past: tuple[Tensor, Tensor] | None = None, visible: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.norm1(h), past, visible)
        h = h + self.dropout(a)
        if self.ffn is not None:
            h = h + self.dropout(self.ffn(self.norm2(h)))
        return h, kv


class SASRecEncoder(SequenceEncoder):
    def __init__(
        self,
        n_items: int,
        n_heads: int = 2,
        ffn_mult: int = 4,
        ffn: bool = True,
        scale_embeddings: bool = False,
        **common: Any,
    ) -> None:
        """`common`: the arguments every encoder takes (`SequenceEncoder`); max_len sizes the learned
        positional table."""
        super().__init__(n_items, **common)
        d_model, dropout = self.d_model, self.dropout_p
        self.n_heads = n_heads
        self.emb_scale = math.sqrt(d_model) if scale_embeddings else 1.0
        self.pos_emb = nn.Embedding(self.max_len, d_model)
        self.emb_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            SASRecBlock(d_model, n_heads, ffn_mult, dropout, ffn) for _ in range(self.n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> Tensor:
        mask = self.check_inputs(items, categories, event_types)
        L = items.shape[1]
        if L > self.max_len:
            raise RecsysError(
                f"sequence length {L} exceeds SASRec max_len {self.max_len}; raise max_len or truncate"
            )
        x = self.embed(items, categories, event_types) * self.emb_scale + self.pos_emb.weight[:L]
        h = self.emb_dropout(x)
        for block in self.blocks:
            h = self.run_block(block, h)[0]
        return self.norm(h) * mask[..., None]

    # ---- streaming with a key/value cache -------------------------------------------------------

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """Empty cache: k/v (batch, n_layers, heads, 0, d/heads), `valid` (batch, 0), `pos` (batch,)."""
        device = device or self.item_emb.weight.device
        dtype = dtype or self.item_emb.weight.dtype
        kv = torch.zeros(
            batch_size,
            self.n_layers,
            self.n_heads,
            0,
            self.d_model // self.n_heads,
            device=device,
            dtype=dtype,
        )
        return {
            "k": kv,
            "v": kv.clone(),
            "valid": torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            "pos": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    @torch.no_grad()
    def prefill(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> State:
        """The key/value cache after each row's events: every layer's keys and values of one causal
        forward (padded keys marked not `valid`)."""
        mask = self.check_inputs(items, categories, event_types)
        L = items.shape[1]
        if L > self.max_len:
            raise RecsysError(f"history length {L} exceeds SASRec max_len {self.max_len}; raise max_len")
        h = self.embed(items, categories, event_types) * self.emb_scale + self.pos_emb.weight[:L]
        ks, vs = [], []
        for block in self.blocks:
            h, (k, v) = block(h)
            ks.append(k)
            vs.append(v)
        return {"k": torch.stack(ks, 1), "v": torch.stack(vs, 1), "valid": mask, "pos": mask.sum(1)}

    def step(
        self, items: Tensor, state: State, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """One event per row -> (hidden (B, d_model), new state). Rows with item 0 are left as they were."""
        real = self.check_step_inputs(items, categories, event_types)
        pos = state["pos"]
        if bool((pos[real] >= self.max_len).any()):
            raise RecsysError(
                f"history longer than SASRec max_len {self.max_len}; the KV cache cannot grow further"
            )
        column = (slice(None), None)
        x = (
            self.embed(items[column], select(categories, column), select(event_types, column))
            * self.emb_scale
        )
        x = x + self.pos_emb(pos.clamp(max=self.max_len - 1))[:, None]
        # The new event always sees itself, so a padding step has a well-defined (discarded) output.
        visible = torch.cat([state["valid"], torch.ones_like(real)[:, None]], dim=1)
        h, ks, vs = x, [], []
        for i, block in enumerate(self.blocks):
            h, (k, v) = block(h, (state["k"][:, i], state["v"][:, i]), visible)
            ks.append(k)
            vs.append(v)
        new_state = {
            "k": torch.stack(ks, 1),
            "v": torch.stack(vs, 1),
            "valid": torch.cat([state["valid"], real[:, None]], dim=1),
            "pos": pos + real.long(),
        }
        return self.norm(h)[:, 0] * real[:, None], new_state

    @staticmethod
    def split_state(state: State) -> list[State]:
        """Per-user caches without the padding keys `merge_states` added: kept, they would stay in a
        user's cache for good and grow it with every batch it joins."""
        out = []
        for i, row in enumerate(SequenceEncoder.split_state(state)):  # other keys (a caller's) as they are
            keep = state["valid"][i].nonzero().squeeze(1)
            row["k"], row["v"] = (row[key].index_select(3, keep) for key in ("k", "v"))
            row["valid"] = row["valid"].index_select(1, keep)
            out.append(row)
        return out

    def merge_states(self, states: list[State]) -> State:
        """Caches of different lengths are right-padded with keys marked not `valid`."""
        longest = max(st["valid"].shape[1] for st in states)

        def pad(t: Tensor, dim: int) -> Tensor:
            return torch.cat(
                [t, t.new_zeros(*t.shape[:dim], longest - t.shape[dim], *t.shape[dim + 1 :])], dim
            )

        return super().merge_states(
            [
                {"k": pad(st["k"], 3), "v": pad(st["v"], 3), "valid": pad(st["valid"], 1), "pos": st["pos"]}
                for st in states
            ]
        )
