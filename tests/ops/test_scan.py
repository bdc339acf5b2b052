from __future__ import annotations

import pytest
import torch
from ops_scan_cases import SHAPES, assert_matches_ref, assert_plain_grads_match, make_inputs

from recsys_mamba.errors import RecsysError
from recsys_mamba.ops import (
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_state_update,
)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_cpu_matches_ref(shape, extras, softplus):
    assert_matches_ref("cpu", make_inputs(*shape, extras=extras, seed=hash((shape, extras)) % 1000), softplus)


def test_cpu_long_sequence_spans_many_backward_chunks():
    assert_matches_ref("cpu", make_inputs(2, 5, 300, 4, 0), True)


def test_cpu_without_initial_state_or_last_state_grad():
    assert_plain_grads_match("cpu")


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_gradcheck_float64(backend):
    x = make_inputs(2, 3, 6, 2, 0, dtype=torch.float64)
    names = list(x)

    def f(*tensors):
        return selective_scan(**dict(zip(names, tensors, strict=True)), delta_softplus=True,
                              return_last_state=True, backend=backend)

    assert torch.autograd.gradcheck(f, [v.requires_grad_() for v in x.values()])


def test_half_inputs_accumulate_in_fp32():
    x = make_inputs(2, 4, 30, 4, 0)
    out, last = selective_scan(**{k: v.half() if k != "A" else v for k, v in x.items()},
                               return_last_state=True, backend="cpu")
    assert out.dtype == torch.float16 and last.dtype == torch.float32
    torch.testing.assert_close(out.float(), selective_scan_ref(**x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_continuation_equals_full_scan(backend):
    x = make_inputs(2, 4, 40, 5, 0)
    x.pop("initial_state")
    full, last = selective_scan(**x, delta_softplus=True, return_last_state=True, backend=backend)
    timed = ("u", "delta", "B", "C", "z")
    first = {k: v[..., :15] if k in timed else v for k, v in x.items()}
    second = {k: v[..., 15:] if k in timed else v for k, v in x.items()}
    y1, s1 = selective_scan(**first, delta_softplus=True, return_last_state=True, backend=backend)
    y2, s2 = selective_scan(**second, delta_softplus=True, return_last_state=True, initial_state=s1,
                            backend=backend)
    torch.testing.assert_close(torch.cat([y1, y2], -1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [0, 2])
def test_state_update_steps_equal_full_scan(groups):
    x = make_inputs(2, 4, 12, 3, groups)
    full = selective_scan(**x, delta_softplus=True, backend="ref")
    state = x["initial_state"].clone()
    for t in range(12):
        y = selective_state_update(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                   x["C"][..., t], x["D"], x["z"][..., t], x["delta_bias"], True)
        torch.testing.assert_close(y, full[..., t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_chunked_equals_full_scan(backend):
    x = make_inputs(1, 3, 100, 4, 0)
    full, last = selective_scan(**x, delta_softplus=True, return_last_state=True, backend=backend)
    out, state = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True, backend=backend,
                                        chunk_size=7)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def test_chunked_million_steps_bounded_memory():
    length, chunk = 1_000_000, 65_536
    x = make_inputs(1, 2, length, 4, 0, extras=False)
    out = selective_scan_chunked(**x, delta_softplus=True, backend="cpu", chunk_size=chunk)
    tail = {k: v[..., -chunk:] if v.dim() == 3 and v.shape[-1] == length else v for k, v in x.items()}
    head = {k: v[..., :-chunk] if v.dim() == 3 and v.shape[-1] == length else v for k, v in x.items()}
    _, s = selective_scan(**head, delta_softplus=True, return_last_state=True, backend="cpu")
    tail["initial_state"] = s
    torch.testing.assert_close(out[..., -chunk:], selective_scan(**tail, delta_softplus=True, backend="cpu"))


def test_cpu_falls_back_to_ref_with_one_warning(monkeypatch):
    import recsys_mamba.ops.backend as backend

    monkeypatch.setattr(backend, "_kernels", None)
    monkeypatch.setitem(__import__("sys").modules, "recsys_mamba.ops._numba_kernels", None)
    x = make_inputs(1, 2, 5, 3, 0)
    with pytest.warns(RuntimeWarning, match="numba unavailable"):
        out = selective_scan(**x, backend="cpu")
    torch.testing.assert_close(out, selective_scan_ref(**x))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selective_scan(**x, backend="cpu")


def test_non_contiguous_inputs_are_handled():
    x = make_inputs(2, 4, 10, 3, 0)
    nc = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() >= 2 else v for k, v in x.items()}
    assert not nc["u"].is_contiguous()
    torch.testing.assert_close(selective_scan(**nc, backend="cpu"), selective_scan_ref(**x))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"A": torch.zeros(5, 3)}, r"A has shape \(5, 3\), expected \(4, d_state\)"),
        ({"delta": torch.zeros(2, 4, 9)}, r"delta has shape \(2, 4, 9\), expected \(2, 4, 10\)"),
        ({"B": torch.zeros(2, 3, 11)}, r"B has shape \(2, 3, 11\)"),
        ({"C": torch.zeros(2, 3, 3, 10)}, r"C has shape \(2, 3, 3, 10\).*groups that divides dim=4"),
        ({"D": torch.zeros(4, 1)}, r"D has shape \(4, 1\), expected \(4,\)"),
        ({"initial_state": torch.zeros(2, 4)}, r"initial_state has shape \(2, 4\)"),
        ({"u": torch.zeros(2, 4, 10, dtype=torch.int64)}, r"u has dtype torch.int64"),
        ({"A": torch.zeros(4, 3, dtype=torch.float16)}, r"A has dtype torch.float16"),
        ({"u": torch.zeros(2, 4, 10, device="meta")}, r"delta is on cpu but u is on meta"),
    ],
)
def test_bad_input_names_argument_and_shapes(change, pattern):
    x = make_inputs(2, 4, 10, 3, 0) | change
    with pytest.raises(RecsysError, match=pattern):
        selective_scan(**x, backend="cpu")


def test_bad_backend_and_triton_on_cpu(monkeypatch):
    x = make_inputs(1, 2, 3, 2, 0)
    with pytest.raises(RecsysError, match="backend='cuda' is not one of"):
        selective_scan(**x, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RecsysError, match="TRITON_INTERPRET=1"):
        selective_scan(**x, backend="triton")


def test_state_update_bad_shape():
    with pytest.raises(RecsysError, match=r"x has shape \(2, 5\), expected \(2, 4\)"):
        selective_state_update(torch.zeros(2, 4, 3), torch.zeros(2, 5), torch.zeros(2, 4), torch.zeros(4, 3),
                               torch.zeros(2, 3), torch.zeros(2, 3))
