"""Triton kernels against `ref` on CPU through the interpreter.

TRITON_INTERPRET must be set before triton is imported, so under a normal run the one test here
re-runs this file in a subprocess with the variable set.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from ops_scan_cases import assert_matches_ref, assert_plain_grads_match, make_inputs

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter run")
def test_triton_kernels_under_interpreter():
    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")


@interpreted
@pytest.mark.parametrize(
    ("shape", "extras", "softplus"),
    [
        ((2, 4, 37, 5, 0), False, False),
        ((1, 3, 1, 4, 0), True, True),
        ((1, 17, 70, 16, 0), True, True),  # dim, length not multiples of the blocks; 3 chunks
        ((2, 8, 33, 3, 2), True, False),
    ],
    ids=str,
)
def test_triton_matches_ref(shape, extras, softplus):
    assert_matches_ref("triton", make_inputs(*shape, extras=extras), softplus)


@interpreted
def test_triton_half_inputs():
    from recsys_mamba.ops import selective_scan, selective_scan_ref

    x = make_inputs(1, 4, 20, 4, 0)
    out, last = selective_scan(**{k: v.half() if k != "A" else v for k, v in x.items()},
                               return_last_state=True, backend="triton")
    assert out.dtype == torch.float16 and last.dtype == torch.float32
    torch.testing.assert_close(out.float(), selective_scan_ref(**x), rtol=2e-2, atol=2e-2)


@interpreted
def test_triton_no_optional_inputs():
    assert_plain_grads_match("triton")
