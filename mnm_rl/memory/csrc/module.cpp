// The Python module of the fused CPU kernels (loaded by mnm_rl/memory/fused.py).
#include <torch/extension.h>

#include "dense_products.h"
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &mnm_rl::mnm_forward, "MNM recurrence over a sequence (forward)");
  m.def("backward", &mnm_rl::mnm_backward, "MNM recurrence over a sequence (backward)");
  // The split runs without the GIL: each part's thread takes the caller's thread-local state,
  // and where that holds Python objects (saved-tensor hooks, torch.autograd.graph's) copying it
  // takes the GIL, which a caller holding it while it waits for the parts would never give.
  m.def("forward_parts", &mnm_rl::mnm_forward_parts,
        "MNM recurrence over a sequence (forward), the batch split into parts run in parallel",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward_parts", &mnm_rl::mnm_backward_parts,
        "MNM recurrence over a sequence (backward) of forward_parts",
        py::call_guard<py::gil_scoped_release>());
  // The LSTM's passes split their batch into parts too (the GIL released, as above).
  m.def("lstm_forward", &mnm_rl::lstm_forward,
        "LSTM with episode resets over a sequence, the batch in parts run in parallel",
        py::call_guard<py::gil_scoped_release>());
  m.def("lstm_backward", &mnm_rl::lstm_backward, "its backward pass",
        py::call_guard<py::gil_scoped_release>());
  m.def("gru_forward", &mnm_rl::gru_forward, "GRU with episode resets over a sequence");
  m.def("gru_backward", &mnm_rl::gru_backward, "its backward pass");
  m.def("linear_forward", &mnm_rl::linear_forward,
        "x W^T + b by the hand-written products, their rows in `parts` parallel parts",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_backward", &mnm_rl::linear_backward,
        "its backward pass: (grad, x, W, needs_x, needs_W, needs_b, parts) -> (dx, dW, db)",
        py::call_guard<py::gil_scoped_release>());
  m.def("reconstruction_errors", &mnm_rl::reconstruction_errors,
        "[2, ...]: mean over the last two dims of (after - values)^2, then of (before - values)^2");
  m.def("summary_statistics", &mnm_rl::summary_statistics,
        "[mean of each tensor..., the largest element of the last] as floats, in one pass");
  m.def(
      "dense_product",
      [](const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& out) {
        // out = a b, or out += a b into a given out: the kernels' hand-written products
        // (dense_products.h), for tests/test_dense_products.py and benchmarks/dense_products.py
        // b given transposed (x W^T) is packed as the kernels pack their weights
        const at::Tensor rows =
            b.dim() == 2 && b.stride(1) != 1 ? mnm_rl::packed_transpose(b.t()) : b;
        if (!out.has_value()) return mnm_rl::product(a, rows);
        mnm_rl::product_into(*out, a, rows, true);
        return *out;
      },
      "a @ b by the kernels' hand-written products; with out, out += a @ b in place",
      py::arg("a"), py::arg("b"), py::arg("out") = py::none());
}
