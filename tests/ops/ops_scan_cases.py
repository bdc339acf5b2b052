"""Shared by the ops tests: random scan inputs and a backend-vs-ref comparison of outputs and grads."""

from __future__ import annotations

import torch

from recsys_mamba.ops import selective_scan

OPTIONAL = ("D", "z", "delta_bias")

# (batch, dim, length, d_state, groups); groups 0 means plain (batch, d_state, length) B and C.
SHAPES = [
    (2, 4, 37, 5, 0),
    (1, 3, 1, 4, 0),
    (1, 17, 70, 16, 0),
    (2, 8, 33, 3, 2),
]


def make_inputs(batch, dim, length, d_state, groups, extras=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    bc_shape = (batch, d_state, length) if not groups else (batch, groups, d_state, length)
    inputs = {
        "u": r(batch, dim, length),
        "delta": torch.rand(batch, dim, length, generator=g, dtype=dtype) * 0.5,
        "A": -torch.rand(dim, d_state, generator=g, dtype=dtype) * 2,
        "B": r(*bc_shape),
        "C": r(*bc_shape),
        "initial_state": r(batch, dim, d_state),
    }
    if extras:
        inputs.update(D=r(dim), z=r(batch, dim, length), delta_bias=r(dim) * 0.5)
    return inputs


def run(backend, inputs, delta_softplus):
    """Forward + backward through a weighted loss on out and last_state; returns values and grads."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out, last = selective_scan(**leaves, delta_softplus=delta_softplus, return_last_state=True,
                               backend=backend)
    w = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    ((out * w).sum() + last.sum()).backward()
    return {"out": out, "last": last} | {f"d{k}": v.grad for k, v in leaves.items()}


def assert_matches_ref(backend, inputs, delta_softplus, rtol=6e-4, atol=2e-3):
    want = run("ref", inputs, delta_softplus)
    got = run(backend, inputs, delta_softplus)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] is not None, name
        torch.testing.assert_close(
            got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


def assert_plain_grads_match(backend):
    """No D, z, delta_bias, initial_state, and no last_state: the backward gets no dlast."""
    x = make_inputs(2, 4, 20, 3, 0, extras=False)
    x.pop("initial_state")
    grads = {}
    for name in ("ref", backend):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        selective_scan(**leaves, backend=name).sum().backward()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    for k in x:
        torch.testing.assert_close(grads[backend][k], grads["ref"][k], rtol=6e-4, atol=2e-3)
