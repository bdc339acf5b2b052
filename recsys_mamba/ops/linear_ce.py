"""Cross-entropy over a full item table without the (N, n_items) score matrix.

`F.cross_entropy(hidden @ weight.T, targets)` writes the score matrix, its log-softmax, a zero-filled
gradient and the log-softmax gradient to memory: on ML-1M (3,417 items) those full passes are about
half of a training step on CPU. Here the rows go through in chunks small enough to stay in cache, and
since the loss is a scalar, each chunk's gradient (softmax - one-hot) is taken while its scores are
at hand, straight into d hidden and d weight; backward only scales them by the incoming gradient.
Same values as the unfused form up to float rounding (BENCHMARKS.md, "Fused loss").

Sparse additive terms (`SparseScore`: a learned scalar weight times values at a few columns of each
row) can be added to the scores, with the weight's gradient taken in the same pass. What the columns
mean (items a user has seen, the successors of the last item, ...) is up to whoever makes the term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from recsys_mamba.errors import RecsysError

CHUNK_ROWS = 256  # rows per chunk: 256 x 3,417 float32 scores = 3.5 MB, inside L2/L3


class SparseColumns(Protocol):
    """Some columns of each of `n_rows` rows, with a value at each (None: 1 at every column > 0)."""

    n_rows: int

    def part(self, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor | None]:
        """(columns, values) of rows start:stop, both (rows, K); slots of column 0 add nothing."""
        ...

    def at(self, candidates: Tensor) -> Tensor:
        """Each row's value at the given columns: candidates (n_rows, K) -> (n_rows, K) (0 where none)."""
        ...


@dataclass(frozen=True)
class SparseScore:
    """`weight` (a scalar, usually learned) times the values of `columns`, added to the scores."""

    weight: Tensor
    columns: SparseColumns


@dataclass(frozen=True)
class FixedColumns:
    """Explicit columns (N, K) and values (N, K) (None: 1 at every column > 0)."""

    columns: Tensor
    values: Tensor | None = None

    @property
    def n_rows(self) -> int:
        return int(self.columns.shape[0])

    def part(self, start: int = 0, stop: int | None = None) -> tuple[Tensor, Tensor | None]:
        rows = slice(start, stop)
        return self.columns[rows], None if self.values is None else self.values[rows]

    def at(self, candidates: Tensor) -> Tensor:
        return values_at(*self.part(), candidates)


def values_at(columns: Tensor, values: Tensor | None, candidates: Tensor) -> Tensor:
    """Each row's value at `candidates` (N, K) given its (columns, values); a row's columns are distinct."""
    order = columns.argsort(dim=1)
    cols = columns.gather(1, order)
    at = torch.searchsorted(cols, candidates.contiguous()).clamp(max=cols.shape[1] - 1)
    found = (cols.gather(1, at) == candidates) & (candidates != 0)
    if values is None:
        return found
    return torch.where(found, values.gather(1, order).gather(1, at), 0.0)


def add_sparse_scores(scores: Tensor, terms: Sequence[SparseScore]) -> Tensor:
    """`scores` (N, V) plus every term, each at its columns (a new tensor)."""
    for term in terms:
        cols, values = term.columns.part()
        added = (cols > 0).to(scores.dtype) if values is None else values.to(scores.dtype)
        scores = scores.scatter_add(1, cols, added * term.weight.to(scores.dtype))
    return scores


def sparse_scores_at(candidates: Tensor, terms: Sequence[SparseScore]) -> Tensor | None:
    """The sum of every term at `candidates` (N, K), or None without terms."""
    total = None
    for term in terms:
        part = term.weight * term.columns.at(candidates)
        total = part if total is None else total + part
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_rows: int,
        label_smoothing: float,
        terms: Sequence[SparseScore],
        *term_weights: Tensor,
    ) -> Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_t = [ctx.needs_input_grad[6 + i] for i in range(len(terms))]
        n, eps = hidden.shape[0], float(label_smoothing)
        with torch.autocast(hidden.device.type, enabled=False):
            ct = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
            h_all, w = hidden.to(ct), weight.to(ct)
            weights = [tw.detach().to(ct) for tw in term_weights]
            grad_h = torch.empty_like(h_all) if want_h else None
            grad_w = torch.zeros_like(w) if want_w else None
            grad_t = [h_all.new_zeros(()) if want else None for want in want_t]
            total = h_all.new_zeros(())
            for start in range(0, n, chunk_rows):
                h = h_all[start : start + chunk_rows]
                t = targets[start : start + chunk_rows, None]
                scores = h @ w.t()
                parts = [term.columns.part(start, start + chunk_rows) for term in terms]
                for (cols, values), tw in zip(parts, weights, strict=True):
                    # column 0 gets 0 (or is refilled below) and stays -inf
                    added = (cols > 0).to(ct) if values is None else values.to(ct)
                    scores.scatter_add_(1, cols, added * tw)
                scores[:, 0] = float("-inf")  # column 0 is the padding item, never a class
                lse = torch.logsumexp(scores, 1, keepdim=True)
                total += (lse - (1.0 - eps) * scores.gather(1, t)).sum()
                if eps:
                    total -= eps * scores[:, 1:].mean(1).sum()
                if not (want_h or want_w or any(want_t)):
                    continue
                grad = scores.sub_(lse).exp_()  # softmax, in place of the scores
                grad.scatter_add_(1, t, grad.new_full(t.shape, eps - 1.0))
                if eps:
                    grad[:, 1:] -= eps / (w.shape[0] - 1)
                if want_h:
                    torch.mm(grad, w, out=grad_h[start : start + chunk_rows])
                if want_w:
                    grad_w.addmm_(grad.t(), h)
                for i, (cols, values) in enumerate(parts):
                    if grad_t[i] is None:
                        continue
                    if values is None:
                        grad_t[i] += grad.gather(1, cols)[cols > 0].sum()
                    else:
                        grad_t[i] += (grad.gather(1, cols) * values.to(ct)).sum()
        ctx.save_for_backward(grad_h, grad_w, *(g if g is not None else h_all.new_zeros(()) for g in grad_t))
        ctx.n = max(n, 1)
        ctx.wanted = [want_h, want_w, *want_t]
        ctx.dtypes = (hidden.dtype, weight.dtype, *(tw.dtype for tw in term_weights))
        return total / ctx.n

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        scale = grad_loss / ctx.n
        grads = [
            (g * scale).to(dtype) if wanted and g is not None else None
            for g, dtype, wanted in zip(ctx.saved_tensors, ctx.dtypes, ctx.wanted, strict=True)
        ]
        return grads[0], grads[1], None, None, None, None, *grads[2:]


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_rows: int = CHUNK_ROWS,
    terms: Sequence[SparseScore] = (),
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean cross-entropy of the scores `hidden @ weight.T` against targets, with column 0 (the
    padding item) excluded from the softmax: hidden (N, d), weight (V, d), targets (N,) in [1, V).

    Each of `terms` adds its scalar weight times its values at its columns of each row (one row per
    target), e.g. a learned bias on the items a row has already seen. With `label_smoothing` eps the
    target is (1 - eps) on the true item plus eps spread evenly over the real items (1..V-1), as
    `F.cross_entropy(..., label_smoothing=eps)` over those columns. Computed in float32, or float64
    for float64 inputs. Not twice differentiable (the gradient is taken in the forward pass).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise RecsysError(
            f"linear_cross_entropy needs hidden (N, d) and weight (V, d), got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise RecsysError(f"targets must be (N,) = ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk_rows < 1:
        raise RecsysError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if not 0.0 <= label_smoothing < 1.0:
        raise RecsysError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    if targets.numel():
        low, high = (int(v) for v in torch.aminmax(targets))
        if low < 1 or high >= weight.shape[0]:
            raise RecsysError(
                f"targets must lie in [1, {weight.shape[0]}) (0 is padding), got values in [{low}, {high}]"
            )
    for i, term in enumerate(terms):
        if term.weight.numel() != 1:
            raise RecsysError(f"terms[{i}].weight must be a scalar, got shape {tuple(term.weight.shape)}")
        if term.columns.n_rows != targets.shape[0]:
            raise RecsysError(
                f"terms[{i}] must have one row per target ({targets.shape[0]}), got {term.columns.n_rows}"
            )
    weights = [term.weight.reshape(()) for term in terms]
    return _LinearCrossEntropy.apply(
        hidden, weight, targets, chunk_rows, float(label_smoothing), tuple(terms), *weights
    )
