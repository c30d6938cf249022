"""A check shared by the fused kernels' tests (``test_fused.py``, ``test_rnn_kernels.py``)."""

from __future__ import annotations

from torch import Tensor


def assert_as_accurate_as_pytorch(
    kernel_out: dict[str, Tensor],
    pytorch_out: dict[str, Tensor],
    exact: dict[str, Tensor],
    rounding: float = 1e-6,
) -> None:
    """Against the float64 result ``exact``, every float32 output and gradient of the kernel
    errs no more than 4x what PyTorch's float32 code errs, plus ``rounding`` of the value's scale
    (its largest magnitude): its own ``tanh``/``sigmoid`` and summation order cost no real
    accuracy."""
    for name, truth in exact.items():
        scale = truth.abs().max().item()
        kernel_error = (kernel_out[name].double() - truth).abs().max().item()
        pytorch_error = (pytorch_out[name].double() - truth).abs().max().item()
        bound = 4 * pytorch_error + rounding * scale
        assert kernel_error <= bound, (name, kernel_error, pytorch_error, bound)
