"""The kernels' hand-written matrix products (``mnm_rl/memory/csrc/dense_products.h``) compute
what ``torch.mm`` computes, for every tile and remainder, with a transposed left operand, and
accumulating into an output."""

from __future__ import annotations

import pytest
import torch
from compiled import built

from mnm_rl.memory import fused, products

# Rows: 8-row tiles, then 4, 2 and 1 (13 = 8 + 4 + 1, 7 = 4 + 2 + 1). Columns: two-vector tiles,
# one vector, then single columns (lanes are 16 floats or 8 doubles: 67 and 19 leave remainders).
SHAPES = [(1, 1, 1), (13, 64, 67), (7, 5, 19), (16, 128, 256), (256, 64, 64), (3, 256, 1)]


@pytest.fixture(scope="module")
def kernel():
    return built(fused.EXTENSION)


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_products_match_torch_mm(kernel, m, k, n, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    a = torch.randn(m, k, generator=gen, dtype=dtype)
    b = torch.randn(k, n, generator=gen, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(kernel.dense_product(a, b), a @ b, **tol)
    # the left operand as a transposed view (a weight gradient's g^T x), the right one packed
    at = torch.randn(k, m, generator=gen, dtype=dtype)
    torch.testing.assert_close(kernel.dense_product(at.t(), b), at.t() @ b, **tol)
    bt = torch.randn(n, k, generator=gen, dtype=dtype)
    torch.testing.assert_close(kernel.dense_product(a, bt.t()), a @ bt.t(), **tol)


def test_a_given_output_accumulates_in_place(kernel):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(11, 9, generator=gen), torch.randn(9, 40, generator=gen)
    start = torch.randn(11, 40, generator=gen)
    out = start.clone()
    pointer = out.data_ptr()
    result = kernel.dense_product(a, b, out)
    assert result.data_ptr() == pointer
    torch.testing.assert_close(out, start + a @ b, rtol=1e-5, atol=1e-5)


def test_other_dtypes_take_atens_product_and_bad_shapes_raise(kernel):
    a = torch.arange(6, dtype=torch.int64).view(2, 3)
    b = torch.arange(12, dtype=torch.int64).view(3, 4)
    assert torch.equal(kernel.dense_product(a, b), a @ b)
    with pytest.raises(RuntimeError, match="product_into"):
        kernel.dense_product(torch.randn(2, 3), torch.randn(4, 5))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_with_its_gradients(kernel, bias):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    y = products.linear(x, w, b)
    assert y.shape == (3, 5, 40)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_DenseLinearBackward"
    expected = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    inputs = [x, w] + ([b] if bias else [])
    got = torch.autograd.grad((y * y).sum(), inputs)
    want = torch.autograd.grad((expected * expected).sum(), inputs)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: products.linear(*a), tuple(inputs))


def test_linear_without_the_kernels_is_f_linear(monkeypatch):
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    y = products.linear(x, w)
    assert torch.equal(y, torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("rows, cols", [(256, 64), (832, 64), (19, 37), (1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_right_operand_given_transposed_is_packed_exactly(kernel, rows, cols, dtype):
    gen = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=gen, dtype=dtype)  # a Linear weight [out, in]
    eye = torch.eye(cols, dtype=dtype)
    # x w^T with x the identity is w^T itself: every entry packed where it belongs
    assert torch.equal(kernel.dense_product(eye, w.t()), w.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_in_parts_equals_one_part_bit_for_bit(kernel, dtype, bias):
    """The rows of the layer's products split between threads (2 or 3 parts, unequal ones
    included; a transposed input too): the same output and gradients as in one part."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(37, 24, generator=gen, dtype=dtype)
    w = torch.randn(67, 24, generator=gen, dtype=dtype)
    b = torch.randn(67, generator=gen, dtype=dtype) if bias else None
    grad = torch.randn(37, 67, generator=gen, dtype=dtype)

    def passes(x, grad, parts):
        return [kernel.linear_forward(x, w, b, parts),
                *kernel.linear_backward(grad, x, w, True, True, bias, parts)]  # fmt: skip

    for inputs in ((x, grad), (x.t().contiguous().t(), grad.t().contiguous().t())):
        one = passes(*inputs, 1)
        for parts in (2, 3):
            for expected, actual in zip(one, passes(*inputs, parts), strict=True):
                assert (expected is None and actual is None) or torch.equal(expected, actual)
    torch.testing.assert_close(one[0], torch.nn.functional.linear(x, w, b))


def test_linear_splits_its_rows_by_the_kernel_threads(monkeypatch):
    monkeypatch.delenv(fused.KERNEL_THREADS_VARIABLE, raising=False)
    fused.set_kernel_threads(2)
    try:
        assert products.row_parts(256) == 2  # a minibatch
        assert products.row_parts(8) == 1  # a rollout step's envs
    finally:
        fused.set_kernel_threads(None)
    fused.set_kernel_threads(1)
    try:
        assert products.row_parts(256) == 1
    finally:
        fused.set_kernel_threads(None)
