from __future__ import annotations

import pytest
import torch
from ops_scan_cases import SHAPES, make_inputs

from recsys_mamba.errors import RecsysError
from recsys_mamba.ops import selective_scan, selective_scan_ref
from recsys_mamba.ops.inference import selective_scan_inference

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _ref_rows(x, lengths, softplus):
    """The reference scan of each row alone, over its first `lengths[b]` steps."""
    outs, lasts = [], []
    for b, n in enumerate(lengths.tolist()):
        row = {
            k: v[b : b + 1] if k in ("u", "delta", "B", "C", "z", "initial_state") else v
            for k, v in x.items()
        }
        row = {k: v[..., :n] if k in ("u", "delta", "B", "C", "z") else v for k, v in row.items()}
        if n == 0:
            outs.append(torch.zeros_like(x["u"][b : b + 1, :, :0]))
            lasts.append(x["initial_state"][b : b + 1].float())
            continue
        out, last = selective_scan_ref(**row, delta_softplus=softplus, return_last_state=True)
        outs.append(out)
        lasts.append(last)
    return outs, torch.cat(lasts)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_no_grad_cpu_scan_matches_ref_and_the_training_kernel(shape, extras, softplus):
    x = make_inputs(*shape, extras=extras, seed=7)
    if "delta_bias" in x:  # no negative step without softplus: the state would overflow to inf
        x["delta_bias"] = x["delta_bias"].abs()
    want = selective_scan_ref(**x, delta_softplus=softplus, return_last_state=True)
    with torch.no_grad():
        got = selective_scan(**x, delta_softplus=softplus, return_last_state=True, backend="cpu")
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    trained = selective_scan(**leaves, delta_softplus=softplus, return_last_state=True, backend="cpu")
    for g, w, t in zip(got, want, trained, strict=True):
        assert not g.requires_grad
        torch.testing.assert_close(g, w, **TOL)
        torch.testing.assert_close(g, t.detach(), **TOL)


def test_grad_enabled_without_grad_inputs_takes_the_inference_kernel():
    x = make_inputs(2, 4, 30, 4, 0)
    with torch.inference_mode():
        got = selective_scan(**x, delta_softplus=True, backend="cpu")
    torch.testing.assert_close(got, selective_scan(**x, delta_softplus=True, backend="ref"), **TOL)


@pytest.mark.parametrize("backend", ["cpu", "ref"])
@pytest.mark.parametrize("groups", [0, 2])
def test_lengths_scan_each_row_only_up_to_its_length(backend, groups):
    x = make_inputs(4, 8, 25, 3, groups, seed=3)
    lengths = torch.tensor([25, 10, 0, 1])
    pad = torch.arange(25) >= lengths[:, None]  # (batch, length): never read, so NaN there changes nothing
    garbage = {
        k: v.masked_fill(pad.view(4, *[1] * (v.dim() - 2), 25), float("nan"))
        for k, v in x.items()
        if k in ("u", "delta", "B", "C", "z")
    }
    out, last = selective_scan_inference(
        **(x | garbage), delta_softplus=True, return_last_state=True, lengths=lengths, backend=backend
    )
    outs, lasts = _ref_rows(x, lengths, True)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b : b + 1, :, :n], outs[b], **TOL)
        assert (out[b, :, n:] == 0).all()
    torch.testing.assert_close(last, lasts, **TOL)


@pytest.mark.parametrize("backend", ["cpu", "ref"])
@pytest.mark.parametrize("gate", ["full", "last", "none"])
def test_last_only_is_each_rows_output_at_its_last_step(backend, gate):
    x = make_inputs(3, 70, 40, 5, 0, seed=5)  # 70 channels: a block of W and a short one
    lengths = torch.tensor([40, 17, 0])
    full = selective_scan_inference(**x, delta_softplus=True, lengths=lengths, backend=backend)
    rows = torch.arange(3)
    want = full[rows, :, (lengths - 1).clamp(min=0)] * (lengths > 0)[:, None]
    if gate == "last":
        x["z"] = x["z"][rows, :, (lengths - 1).clamp(min=0)]
    elif gate == "none":
        x.pop("z")
        want = selective_scan_inference(**x, delta_softplus=True, lengths=lengths, backend=backend)
        want = want[rows, :, (lengths - 1).clamp(min=0)] * (lengths > 0)[:, None]
    out, last = selective_scan_inference(
        **x, delta_softplus=True, return_last_state=True, lengths=lengths, last_only=True, backend=backend
    )
    assert out.shape == (3, 70)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(last, _ref_rows(x, lengths, True)[1], **TOL)


def test_inference_agrees_across_backends_in_half_precision():
    x = {k: v.half() if k != "A" else v for k, v in make_inputs(2, 6, 20, 4, 0).items()}
    lengths = torch.tensor([20, 9])
    cpu = selective_scan_inference(**x, delta_softplus=True, lengths=lengths, last_only=True, backend="cpu")
    ref = selective_scan_inference(**x, delta_softplus=True, lengths=lengths, last_only=True, backend="ref")
    assert cpu.dtype == torch.float16
    torch.testing.assert_close(cpu.float(), ref.float(), rtol=2e-3, atol=2e-3)


def test_inference_checks_its_extra_arguments():
    x = make_inputs(2, 4, 10, 3, 0)
    with pytest.raises(RecsysError, match="lengths must be a"):
        selective_scan_inference(**x, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(RecsysError, match="integer step counts"):
        selective_scan_inference(**x, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(RecsysError, match="goes with last_only=True"):
        selective_scan_inference(**(x | {"z": x["z"][..., 0]}))
    with pytest.raises(RecsysError, match=r"u has shape \(2, 4, 5\)|expected"):
        selective_scan_inference(**(x | {"u": x["u"][..., :5]}))
