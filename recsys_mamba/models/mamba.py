"""Mamba encoder: residual blocks around a selective state-space mixer (Gu & Dao, 2023).

Item embedding (+ side features) -> n_layers blocks -> final norm. A block is pre-norm -> mixer ->
dropout -> residual, optionally followed by a pre-norm position-wise feed-forward sub-block. The
mixer is in_proj to x and z -> causal depthwise conv1d -> SiLU -> x_proj to (dt, B, C) -> dt_proj
-> selective scan (`recsys_mamba.ops`) with D skip and SiLU(z) gate -> out_proj.

Everything is causal, so right padding cannot reach a real position. When a state is carried,
padding also gets dt = 0 (the SSM state passes through unchanged) and is kept out of the conv state,
so a state carried out of a padded batch is the state after each row's last real event. That state
(conv window + SSM state per layer) has a fixed size however long the history: `step` streams one event
at a time and `encode_long` encodes very long histories chunk by chunk with bounded memory.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_mamba.errors import RecsysError
from recsys_mamba.models.base import Dropout, FeedForward, SequenceEncoder, State, select
from recsys_mamba.ops import selective_scan, selective_state_update
from recsys_mamba.ops.conv import causal_conv1d
from recsys_mamba.ops.inference import selective_scan_inference
from recsys_mamba.ops.norm import FUSED_MIN_NUMEL, rms_norm

LayerState = tuple[Tensor, Tensor]  # conv window (B, d_inner, d_conv - 1), SSM state (B, d_inner, d_state)


class Packed(NamedTuple):
    """The real events of a right-padded (B, L) batch, in row order: inference runs its position-wise
    layers (projections, norms, feed-forward) on these T events alone, not on the padding."""

    index: Tensor  # (T,) each event's position in the flattened B * L
    lengths: Tensor  # (B,) real events per row
    last: Tensor  # (B,) each row's last event among the T (0 for a row without events)
    shape: tuple[int, int]  # (B, L)

    @classmethod
    def of(cls, mask: Tensor) -> Packed:
        """mask (B, L), True at real events (right padding)."""
        lengths = mask.sum(1)
        ends = lengths.cumsum(0)
        index = mask.flatten().nonzero().squeeze(1)
        return cls(index, lengths, (ends - 1).clamp(min=0), tuple(mask.shape))

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, d) -> (T, d)."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: Tensor, fill: bool = True) -> Tensor:
        """(T, d) -> (B, L, d), zeros at padding (fill=False: whatever the memory held)."""
        size = (self.shape[0] * self.shape[1], x.shape[-1])
        out = x.new_zeros(size) if fill else x.new_empty(size)
        # index_copy_, not a copy per row: at L = 2,000 the row copies made last_hidden 3x slower
        return out.index_copy_(0, self.index, x).view(*self.shape, -1)


class MambaMixer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        # Mamba's initialisation: dt starts log-uniform in [dt_min, dt_max] (its bias is the
        # inverse softplus of that), A = -(1..d_state) per channel (S4D-real), D = 1.
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., d_inner) after the conv -> raw dt (..., d_inner) before dt_proj's bias and the
        softplus, B and C (..., d_state)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt @ W^T with W^T made contiguous: autograd then forms the weight gradient as dt^T @ grad,
        # (dt_rank, tokens) x (tokens, d_inner), which runs 6-8x faster on CPU than F.linear's
        # grad^T @ dt with its output dt_rank wide (BENCHMARKS.md, "Encoders against sequence length").
        return torch.matmul(dt, self.dt_proj.weight.t().contiguous()), B, C

    def _x(self, h: Tensor) -> Tensor:
        """x, the scan's input before the conv: (..., d_model) -> (..., d_inner)."""
        # Two projections (this one and `_gate`), not one split in two: each output is contiguous
        # channels-last (B, L, d_inner), the layout the conv, x_proj and the CPU scan all read without
        # copying.
        return F.linear(h, self.in_proj.weight[: self.d_inner])

    def _conv(self, x: Tensor, conv_state: Tensor | None) -> Tensor:
        """The causal conv + SiLU of x (B, L, d_inner). The carried conv window (zeros at the start) is
        its left context, so it continues across chunks. Channels last in and out: (B, d_inner, L)
        views of (B, L, d_inner) memory."""
        return causal_conv1d(
            x.transpose(1, 2),
            self.conv1d.weight[:, 0],
            self.conv1d.bias,
            initial_states=conv_state,
            activation="silu",
            backend=self.scan_backend,
        ).transpose(1, 2)

    def _gate(self, h: Tensor) -> Tensor:
        """z, the input of the output gate SiLU(z): (..., d_model) -> (..., d_inner)."""
        return F.linear(h, self.in_proj.weight[self.d_inner :])

    def forward(
        self, h: Tensor, mask: Tensor, state: LayerState | None = None
    ) -> tuple[Tensor, LayerState | None]:
        """h (B, L, d_model), mask (B, L) -> (B, L, d_model) and, when a state came in, the state after it."""
        carry = state is not None
        if not carry and not torch.is_grad_enabled():
            packed = Packed.of(mask > 0)
            return packed.unpack(self.infer(packed.pack(h), packed)), None
        x_in = self._x(h)
        x = self._conv(x_in, state[0] if carry else None)
        z = self._gate(h)
        dt, B, C = self._ssm_inputs(x)
        if carry:
            # dt = 0 at padding: the state passes through unchanged, so the state carried out is the one
            # after each row's last real event. Without a carried state padding needs nothing: it only
            # follows real events (right padding, causal layers), and the encoder zeroes its outputs.
            dt = F.softplus(dt + self.dt_proj.bias) * mask[..., None]
        # selective_scan_fn's layouts, (B, d_inner, L) and (B, d_state, L), as transposed views
        out = selective_scan(
            x.transpose(1, 2),
            dt.transpose(1, 2),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            z.transpose(1, 2),
            delta_bias=None if carry else self.dt_proj.bias,
            delta_softplus=not carry,
            return_last_state=carry,
            initial_state=state[1] if carry else None,
            backend=self.scan_backend,
        )
        if not carry:
            return self.out_proj(out.transpose(1, 2)), None
        y, ssm = out
        # The new conv window is the last d_conv - 1 inputs up to each row's last real event.
        x_padded = torch.cat([state[0].transpose(1, 2).to(x_in.dtype), x_in], dim=1)
        lengths = mask.sum(1).long()
        idx = (lengths[:, None] + torch.arange(self.d_conv - 1, device=h.device))[:, :, None]
        window = x_padded.gather(1, idx.expand(-1, -1, self.d_inner)).transpose(1, 2)
        return self.out_proj(y.transpose(1, 2)), (window.to(state[0].dtype), ssm.to(state[1].dtype))

    def infer(self, h: Tensor, packed: Packed, last_only: bool = False) -> Tensor:
        """`forward` without a state, for inference (no gradients), on the real events alone: h (T, d_model)
        packed (`Packed`) -> (T, d_model). Only the conv and the scan see the padded (B, L) layout, their
        padding left unwritten: a causal conv never reads it at a real event, and the scan stops at each
        row's length (`ops.inference`). last_only: (B, d_model), each row's output at its last event
        alone, so z (the gate) and out_proj run at that position only."""
        x = packed.pack(self._conv(packed.unpack(self._x(h), fill=False), None))
        dt, B, C = self._ssm_inputs(x)

        def padded(t: Tensor) -> Tensor:  # (T, k) -> (B, k, L), selective_scan_fn's layout
            return packed.unpack(t, fill=False).transpose(1, 2)

        z = self._gate(h[packed.last]) if last_only else padded(self._gate(h))
        y = selective_scan_inference(
            padded(x),
            padded(dt),
            -torch.exp(self.A_log.float()),
            padded(B),
            padded(C),
            self.D.float(),
            z,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            lengths=packed.lengths,
            last_only=last_only,
            backend=self.scan_backend,
        )
        return self.out_proj(y if last_only else packed.pack(y.transpose(1, 2)))

    def step(self, h: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """One event: h (B, d_model) -> (B, d_model) and the next state; the input state is not modified."""
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (B, d_inner) each
        window = torch.cat([state[0], x[:, :, None]], dim=-1)  # (B, d_inner, d_conv)
        x = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
        dt, B, C = self._ssm_inputs(x)
        ssm = state[1].clone()
        y = selective_state_update(
            ssm,
            x,
            dt,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.D.float(),
            z,
            dt_bias=self.dt_proj.bias,
            dt_softplus=True,
        )
        return self.out_proj(y), (window[:, :, 1:], ssm)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict) with the fused CPU kernel of `ops.norm`."""

    def __init__(self, d_model: int, eps: float, backend: str = "auto") -> None:
        super().__init__(d_model, eps=eps)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() < FUSED_MIN_NUMEL:  # a streaming step: skip the call, torch's op is cheaper here
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps, backend=self.backend)


def make_norm(kind: str, d_model: int, backend: str = "auto") -> nn.Module:
    """The block's norm; `backend` (`ops.backend`) also picks the RMSNorm kernel, as it does the scan's."""
    if kind == "rmsnorm":
        return RMSNorm(d_model, eps=1e-5, backend=backend)
    if kind == "layernorm":
        return nn.LayerNorm(d_model, eps=1e-5)
    raise RecsysError(f"norm must be 'rmsnorm' or 'layernorm', got {kind!r}")


class MambaBlock(nn.Module):
    def __init__(
        self, d_model: int, norm: str, ffn: bool, ffn_mult: int, dropout: float, **mixer_kwargs
    ) -> None:
        super().__init__()
        backend = mixer_kwargs.get("scan_backend", "auto")
        self.norm = make_norm(norm, d_model, backend)
        self.mixer = MambaMixer(d_model, **mixer_kwargs)
        self.dropout = Dropout(dropout)
        self.ffn_norm = make_norm(norm, d_model, backend) if ffn else None
        self.ffn = FeedForward(d_model, ffn_mult, dropout) if ffn else None

    def _ffn(self, h: Tensor) -> Tensor:
        if self.ffn is None:
            return h
        return h + self.dropout(self.ffn(self.ffn_norm(h)))

    def forward(
        self, h: Tensor, mask: Tensor, state: LayerState | None = None
    ) -> tuple[Tensor, LayerState | None]:
        y, state = self.mixer(self.norm(h), mask, state)
        return self._ffn(h + self.dropout(y)), state

    def step(self, h: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        y, state = self.mixer.step(self.norm(h), state)
        return self._ffn(h + self.dropout(y)), state

    def infer(self, h: Tensor, packed: Packed, last_only: bool = False) -> Tensor:
        """`forward` for inference on packed real events (`MambaMixer.infer`): (T, d_model) ->
        (T, d_model), or with last_only (B, d_model) at each row's last event."""
        y = self.mixer.infer(self.norm(h), packed, last_only)
        return self._ffn((h[packed.last] if last_only else h) + self.dropout(y))


class MambaEncoder(SequenceEncoder):
    no_decay_names = ("A_log",)  # 1-D D, dt_proj.bias, norms and biases are excluded by the base

    def __init__(
        self,
        n_items: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        norm: str = "rmsnorm",
        ffn: bool = True,
        ffn_mult: int = 4,
        scan_backend: str = "auto",
        **common: Any,
    ) -> None:
        """`common`: the arguments every encoder takes (`SequenceEncoder`: d_model, n_layers, dropout,
        max_len, side-feature sizes, item attributes, ...). scan_backend: the `ops.backend` of every
        kernel of the blocks (scan, conv, norm)."""
        super().__init__(n_items, **common)
        if d_conv < 2:
            raise RecsysError(f"d_conv must be >= 2, got {d_conv}")
        d_model, dropout = self.d_model, self.dropout_p
        self.emb_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            MambaBlock(
                d_model,
                norm,
                ffn,
                ffn_mult,
                dropout,
                d_state=d_state,
                d_conv=d_conv,
                expand=expand,
                dt_rank=dt_rank,
                dt_min=dt_min,
                dt_max=dt_max,
                scan_backend=scan_backend,
            )
            for _ in range(self.n_layers)
        )
        self.norm = make_norm(norm, d_model, scan_backend)
        # Mamba's pre-norm residual rescaling: keep the residual stream's variance flat in depth.
        for block in self.blocks:
            with torch.no_grad():
                block.mixer.out_proj.weight /= math.sqrt(self.n_layers)

    def forward(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> Tensor:
        """max_len does not apply: the model has no positional table, any length works."""
        mask = self.check_inputs(items, categories, event_types)
        h = self.emb_dropout(self.embed(items, categories, event_types))
        m = mask.to(h.dtype)
        for block in self.blocks:
            h = self.run_block(block, h, m)[0]
        return self.norm(h) * m[..., None]

    def last_hidden(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> Tensor:
        """`SequenceEncoder.last_hidden`. In eval mode without gradients only the real events are encoded
        (`Packed`; the conv and the scan alone see the padded layout, and no scan goes past a row's
        length), and the last block runs its gate, out_proj and feed-forward at each row's last event."""
        if self.training or torch.is_grad_enabled():
            return super().last_hidden(items, categories, event_types)
        mask = self.check_inputs(items, categories, event_types)
        if not mask.any():
            return self.item_emb.weight.new_zeros(items.shape[0], self.d_model)
        packed = Packed.of(mask)
        h = self.embed(items[mask], select(categories, mask), select(event_types, mask))
        for i, block in enumerate(self.blocks):
            h = block.infer(h, packed, last_only=i == len(self.blocks) - 1)
        return self.norm(h) * (packed.lengths > 0).to(h.dtype)[:, None]

    # ---- streaming and long histories -----------------------------------------------------------

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """Zeros, float32 unless told: "conv" (B, n_layers, d_inner, d_conv - 1) and
        "ssm" (B, n_layers, d_inner, d_state).

        Its size depends on the model and the batch only, never on how many events it has seen.
        """
        mixer = self.blocks[0].mixer
        device = device or self.item_emb.weight.device
        dtype = dtype or torch.float32
        return {
            "conv": torch.zeros(
                batch_size, self.n_layers, mixer.d_inner, mixer.d_conv - 1, device=device, dtype=dtype
            ),
            "ssm": torch.zeros(
                batch_size, self.n_layers, mixer.d_inner, mixer.d_state, device=device, dtype=dtype
            ),
        }

    def step(
        self, items: Tensor, state: State, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """One event per row -> (hidden (B, d_model), new state). Rows with item 0 keep their state."""
        real = self.check_step_inputs(items, categories, event_types)
        h = self.embed(items, categories, event_types)
        convs, ssms = [], []
        for i, block in enumerate(self.blocks):
            h, (conv, ssm) = block.step(h, (state["conv"][:, i].to(h.dtype), state["ssm"][:, i]))
            convs.append(conv)
            ssms.append(ssm)
        keep = ~real[:, None, None, None]
        new_state = {
            "conv": torch.where(keep, state["conv"], torch.stack(convs, 1).to(state["conv"].dtype)),
            "ssm": torch.where(keep, state["ssm"], torch.stack(ssms, 1).to(state["ssm"].dtype)),
        }
        return self.norm(h) * real[:, None], new_state

    def prefill(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> State:
        """The state after each row's events, in one chunked pass (`encode_long`)."""
        return self.encode_long(items, categories, event_types, return_state=True)[1]

    @torch.no_grad()
    def encode_long(
        self,
        items: Tensor,
        categories: Tensor | None = None,
        event_types: Tensor | None = None,
        chunk_size: int = 4096,
        state: State | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, State]:
        """Encode a history of any length chunk by chunk, carrying conv + SSM state across chunks.

        Equals `forward` (in eval mode) up to float rounding; working memory is bounded by the
        chunk, not the history. Starts from `state` when given (a user's saved state), and with
        return_state also returns the state after each row's last real event.
        """
        if chunk_size < 1:
            raise RecsysError(f"chunk_size must be >= 1, got {chunk_size}")
        mask = self.check_inputs(items, categories, event_types)
        state = self.init_state(items.shape[0], items.device) if state is None else state
        convs, ssms = list(state["conv"].unbind(1)), list(state["ssm"].unbind(1))
        outputs = []
        for start in range(0, items.shape[1], chunk_size):
            part = (slice(None), slice(start, start + chunk_size))
            h = self.embed(items[part], select(categories, part), select(event_types, part))
            m = mask[part].to(h.dtype)
            for i, block in enumerate(self.blocks):
                h, (convs[i], ssms[i]) = block(h, m, (convs[i].to(h.dtype), ssms[i]))
            outputs.append(self.norm(h) * m[..., None])
        hidden = torch.cat(outputs, dim=1)
        if not return_state:
            return hidden
        return hidden, {"conv": torch.stack(convs, 1).to(state["conv"].dtype), "ssm": torch.stack(ssms, 1)}
