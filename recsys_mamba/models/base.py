"""The contract every sequence encoder follows, and the pieces they all share.

An encoder maps a right-padded batch of item ids (0 = padding) plus optional side inputs
(category, event type) to hidden states (batch, length, d_model). Scores are dot products with the
tied item vectors: the item's own embedding, plus the mean embedding of its attributes when the data
has item attributes, so an item seen in few training events still shares what its attributes
learned, as an input and as a prediction. Streaming goes through `init_state` / `step`; a state
is a dict of tensors, batch first, that `split_state` / `merge_states` cut into per-user states
and `save_state` / `load_state` turn into bytes for a key-value store.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from recsys_mamba.errors import RecsysError
from recsys_mamba.ops.linear_ce import SparseScore, linear_cross_entropy
from recsys_mamba.sequences.padding import gather_last

State = dict[str, Tensor]
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


class SequenceEncoder(nn.Module):
    # Parameter names (last component) that AdamW must not decay, besides every 1-D parameter.
    no_decay_names: tuple[str, ...] = ()
    uses_sequence = True  # False: a baseline whose hidden states ignore the events (models.static)

    def __init__(
        self,
        n_items: int,
        *,
        n_categories: int = 0,
        n_event_types: int = 0,
        d_model: int = 64,
        n_layers: int = 2,
        dropout: float = 0.2,
        max_len: int = 200,
        gradient_checkpointing: bool = False,
        item_attributes: Tensor | None = None,
        ffn: bool = False,
        item_dropout: float = 0.0,
    ) -> None:
        """item_attributes: (n_items + 1, K) attribute ids per item (1..n_attributes, 0 = padding),
        e.g. `recsys_mamba.data.load_item_attributes`; None for items without side features.
        ffn: encoders built of blocks (Mamba, SASRec) take it themselves (a feed-forward sub-block per
        block); one without blocks accepts it here and has none, so an experiment can set it for any.
        item_dropout: in training, the probability that an event's item vector (embedding and
        attributes) is zeroed as a whole; its side features stay."""
        super().__init__()
        if n_items < 1:
            raise RecsysError(f"n_items must be >= 1, got {n_items}")
        self.n_items = n_items
        self.n_categories = n_categories
        self.n_event_types = n_event_types
        self.d_model = d_model
        self.n_layers = n_layers
        self.dropout_p = dropout
        if not 0.0 <= item_dropout < 1.0:
            raise RecsysError(f"item_dropout must be in [0, 1), got {item_dropout}")
        self.item_dropout = item_dropout
        self.max_len = max_len
        self.gradient_checkpointing = gradient_checkpointing
        # Row 0 is padding everywhere, so id i is row i and padded positions embed to zero.
        self.item_emb = nn.Embedding(n_items + 1, d_model, padding_idx=0)
        self.category_emb = (
            nn.Embedding(n_categories + 1, d_model, padding_idx=0) if n_categories > 0 else None
        )
        self.event_type_emb = (
            nn.Embedding(n_event_types + 1, d_model, padding_idx=0) if n_event_types > 0 else None
        )
        self.attribute_emb: nn.EmbeddingBag | None = None
        if item_attributes is not None:
            table = _attribute_table(item_attributes, n_items)
            self.register_buffer("item_attributes", table)  # saved with the weights: checkpoints stand alone
            self.attribute_emb = nn.EmbeddingBag(int(table.max()) + 1, d_model, mode="mean", padding_idx=0)
        for emb in (self.item_emb, self.category_emb, self.event_type_emb, self.attribute_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
                with torch.no_grad():
                    emb.weight[0].zero_()

    # ---- inputs ---------------------------------------------------------------------------------

    def check_inputs(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> Tensor:
        """Validate a right-padded batch and return its mask (batch, length), True at real events."""
        if not isinstance(items, Tensor) or items.dim() != 2:
            shape = tuple(items.shape) if isinstance(items, Tensor) else type(items).__name__
            raise RecsysError(f"items must be a LongTensor of shape (batch, length), got {shape}")
        if items.shape[0] == 0 or items.shape[1] == 0:
            raise RecsysError(
                f"empty sequence batch: items has shape {tuple(items.shape)}; need batch, length >= 1"
            )
        _check_ids("items", items, self.n_items)
        mask = items != 0
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise RecsysError(
                "items must be right-padded: a real item (id > 0) follows a padding 0 in some row"
            )
        for name, ids, count in (
            ("categories", categories, self.n_categories),
            ("event_types", event_types, self.n_event_types),
        ):
            if ids is not None and count > 0:  # an encoder without that embedding ignores the input
                if not isinstance(ids, Tensor) or ids.shape != items.shape:
                    got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
                    raise RecsysError(f"{name} must have the shape of items {tuple(items.shape)}, got {got}")
                _check_ids(name, ids, count)
        return mask

    @property
    def n_attributes(self) -> int:
        return 0 if self.attribute_emb is None else self.attribute_emb.num_embeddings - 1

    def item_vectors(self, items: Tensor | None = None) -> Tensor:
        """The tied vector of each item id in `items` (..., d_model), or of every id 0..n_items:
        its embedding plus the mean embedding of its attributes (padding excluded)."""
        if self.attribute_emb is None:
            return self.item_emb.weight if items is None else self.item_emb(items)
        if items is None:
            return self.item_emb.weight + self.attribute_emb(self.item_attributes)
        flat = items.reshape(-1)
        attributes = self.attribute_emb(self.item_attributes[flat]).view(*items.shape, -1)
        return self.item_emb(items) + attributes

    def embed(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> Tensor:
        """Item vector plus whichever side-feature embeddings this encoder has and were given."""
        x = self.item_vectors(items)
        if self.training and self.item_dropout > 0:
            # Whole items, not channels: the encoder learns to read an event from its context, as it
            # must for items seen too rarely in training to have a useful vector.
            kept = torch.rand(items.shape, device=x.device) >= self.item_dropout
            x = x * kept.to(x.dtype)[..., None]
        if categories is not None and self.category_emb is not None:
            x = x + self.category_emb(categories)
        if event_types is not None and self.event_type_emb is not None:
            x = x + self.event_type_emb(event_types)
        return x

    def encode(self, batch: Mapping[str, Tensor]) -> Tensor:
        """`forward` on a batch dict with "items" and optional "categories", "event_types"."""
        return self(batch["items"], batch.get("categories"), batch.get("event_types"))

    def forward(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> Tensor:
        raise NotImplementedError

    def encode_last(self, batch: Mapping[str, Tensor]) -> Tensor:
        """`last_hidden` on a batch dict, as `encode` is `forward` on one."""
        return self.last_hidden(batch["items"], batch.get("categories"), batch.get("event_types"))

    def last_hidden(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> Tensor:
        """The hidden state at each row's last real event (B, d_model), what ranking the next item
        reads: `forward` gathered at position length - 1 (position 0 for a row without events). An
        encoder may compute that position alone when nothing needs a gradient."""
        return gather_last(self(items, categories, event_types), (items != 0).sum(1))

    def run_block(self, block: nn.Module, *args: Any) -> Any:
        """`block(*args)`, recomputed in the backward pass when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ---- scoring --------------------------------------------------------------------------------

    def score_all(self, hidden: Tensor) -> Tensor:
        """Scores of every item, (..., n_items + 1).

        The issue's (batch, n_items) with the padding column kept so that column i is item id i;
        column 0 is always -inf so padding is never ranked or predicted.
        """
        scores = hidden @ self.item_vectors().t()
        scores[..., 0] = float("-inf")
        return scores

    def cross_entropy_all(
        self,
        hidden: Tensor,
        targets: Tensor,
        terms: Sequence[SparseScore] = (),
        label_smoothing: float = 0.0,
    ) -> Tensor:
        """Mean cross-entropy of `score_all(hidden)` (plus the sparse `terms`, one row per target)
        against targets (N,) in [1, n_items], without the (N, n_items + 1) score matrix
        (`ops.linear_cross_entropy`). An encoder that overrides score_all overrides this too."""
        return linear_cross_entropy(
            hidden, self.item_vectors(), targets, terms=terms, label_smoothing=label_smoothing
        )

    def score_candidates(self, hidden: Tensor, items: Tensor) -> Tensor:
        """Scores of given candidates: hidden (..., d_model), items (..., K) -> (..., K)."""
        _check_ids("candidate items", items, self.n_items)
        return (self.item_vectors(items) @ hidden.unsqueeze(-1)).squeeze(-1)

    # ---- optimisation ---------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Full parameter names AdamW must not decay: biases, norms, and the model's `no_decay_names`."""
        return {
            name
            for name, p in self.named_parameters()
            if p.dim() < 2 or name.rsplit(".", 1)[-1] in self.no_decay_names
        }

    # ---- streaming ------------------------------------------------------------------------------

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        raise NotImplementedError

    def step(
        self, items: Tensor, state: State, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> tuple[Tensor, State]:
        raise NotImplementedError

    @torch.no_grad()
    def prefill(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> State:
        """The streaming state after each row's events of a right-padded batch (B, L): what `step`
        continues from. This one steps through the columns; encoders override it with one pass."""
        self.check_inputs(items, categories, event_types)
        state = self.init_state(items.shape[0], items.device)
        for t in range(items.shape[1]):  # padding steps (item 0) leave a row's state as it was
            state = self.step(
                items[:, t],
                state,
                select(categories, (slice(None), t)),
                select(event_types, (slice(None), t)),
            )[1]
        return state

    def check_step_inputs(
        self, items: Tensor, categories: Tensor | None = None, event_types: Tensor | None = None
    ) -> Tensor:
        """Validate one event per row, items (batch,); returns the mask of rows with a real event."""
        if not isinstance(items, Tensor) or items.dim() != 1 or items.shape[0] == 0:
            shape = tuple(items.shape) if isinstance(items, Tensor) else type(items).__name__
            raise RecsysError(f"step takes items of shape (batch,) with batch >= 1, got {shape}")
        column = (slice(None), None)
        return self.check_inputs(items[column], select(categories, column), select(event_types, column))[:, 0]

    # Every state tensor has the batch first, so a batch state splits into per-user states and back.

    @staticmethod
    def split_state(state: State) -> list[State]:
        """One state per batch row (each with batch size 1), e.g. to store per user. Copies, not views:
        a view keeps the whole batch's memory alive, and `save_state` would write all of it."""
        batch = next(iter(state.values())).shape[0]
        return [{k: v[i : i + 1].clone() for k, v in state.items()} for i in range(batch)]

    def merge_states(self, states: list[State]) -> State:
        """Concatenate per-user states into one batch state (inverse of `split_state`)."""
        return {k: torch.cat([st[k] for st in states]) for k in states[0]}

    @staticmethod
    def save_state(state: State) -> bytes:
        """Serialise a state (dict of tensors) for a key-value store; tensors are moved to the CPU.
        The safetensors format (loading it runs no code), written here directly: the online service
        writes every user of every batch of events, and safetensors' own checks took 10x longer than
        the copy (torch.save: 20x)."""
        header: dict[str, Any] = {}
        parts = []
        offset = 0
        for name, tensor in state.items():
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + len(raw)],
            }
            parts.append(raw)
            offset += len(raw)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        return b"".join([struct.pack("<Q", len(text)), text, *parts])

    @staticmethod
    def load_state(data: bytes, device: torch.device | str | None = None) -> State:
        """Inverse of `save_state`; also reads the torch.save (zip) states of earlier versions."""
        if data[:4] == b"PK\x03\x04":
            return dict(torch.load(io.BytesIO(data), map_location=device, weights_only=True))
        (size,) = struct.unpack_from("<Q", data)
        header = json.loads(data[8 : 8 + size])
        body = bytearray(data[8 + size :])  # writable: torch.frombuffer warns on read-only memory
        state = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            dtype = _TORCH_DTYPES[meta["dtype"]]
            flat = torch.frombuffer(body, dtype=torch.uint8, count=end - begin, offset=begin)
            state[name] = flat.view(dtype).reshape(meta["shape"])
        return state if device is None else {k: v.to(device) for k, v in state.items()}


class Dropout(nn.Dropout):
    """nn.Dropout with a faster mask on CPU, where F.dropout draws one `bernoulli_` at a time (a
    quarter of a Mamba training step at L = 200, BENCHMARKS.md). Each element gets 16 random bits,
    four from every 64-bit draw, and is dropped when they fall below p * 2^16 rounded up: a Bernoulli
    mask with p on a 1/65536 grid (0.2 drops 0.200012), 6x faster to draw than uniform floats. The
    kept values are scaled by 1 / P(keep) of that grid, so the expectation is exactly x. On other
    devices: F.dropout."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        dropped = math.ceil(self.p * 65536)
        if x.device.type != "cpu" or dropped >= 65536:
            return super().forward(x)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = words.view(torch.int16)[:n].view(x.shape) >= dropped - 32768
        return x * keep * (65536 / (65536 - dropped))


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear -> GELU -> dropout -> Linear."""

    def __init__(self, d_model: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, mult * d_model),
            nn.GELU(),
            Dropout(dropout),
            nn.Linear(mult * d_model, d_model),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def select(t: Tensor | None, index: Any) -> Tensor | None:
    """`t[index]` for an optional side input."""
    return None if t is None else t[index]


def _check_ids(name: str, ids: Tensor, count: int) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise RecsysError(f"{name} must hold integer ids (torch.long), got dtype {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high > count:
        raise RecsysError(
            f"{name} ids must lie in [0, {count}] (0 = padding), got values in [{low}, {high}]; "
            f"check the vocabulary sizes passed to the encoder"
        )


def _attribute_table(table: Any, n_items: int) -> Tensor:
    """Check an (n_items + 1, K) table of attribute ids (row 0 = padding item) and return it as long."""
    table = torch.as_tensor(table)
    if table.dim() != 2 or table.shape[0] != n_items + 1 or table.shape[1] < 1:
        raise RecsysError(
            f"item_attributes must have shape (n_items + 1, K) = ({n_items + 1}, K >= 1), got "
            f"{tuple(table.shape)}; build it from the prepared data (recsys_mamba.data.load_item_attributes)"
        )
    if table.is_floating_point() or table.is_complex() or table.dtype == torch.bool:
        raise RecsysError(f"item_attributes must hold integer attribute ids, got dtype {table.dtype}")
    table = table.long()
    if int(table.min()) < 0 or int(table.max()) < 1 or bool(table[0].any()):
        raise RecsysError(
            "item_attributes must hold ids >= 1 with 0 as padding, at least one attribute, and an all-0 "
            f"row 0 (the padding item); got values in [{int(table.min())}, {int(table.max())}]"
        )
    return table
