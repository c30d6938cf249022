// The fused CPU kernels' entry points, bound to Python in module.cpp.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace mnm_rl {

// Set inside each kernel's loop: the ATen calls there (products into views, steps of a buffer,
// copies) go straight to the CPU implementations, past the dispatcher's autograd and
// view-tracking (ADInplaceOrView) layers, whose cost per call does not depend on the size.
// Nothing in a kernel is differentiated by autograd (each kernel has its own backward pass), and
// what it returns is made outside the loop, so autograd still sees ordinary tensors and views.
// An MNM training pass makes thousands of such calls.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// mnm_sequence.cpp: the MNM recurrence (see there for the arguments and outputs).
std::vector<at::Tensor> mnm_forward(const at::Tensor& gates_x, const at::Tensor& keep,
                                    const at::Tensor& h0, const at::Tensor& c0,
                                    const at::Tensor& r0, const at::Tensor& m0,
                                    const at::Tensor& w_rec, const at::Tensor& w_int,
                                    const at::Tensor& b_int, const at::Tensor& w_beta,
                                    const at::Tensor& b_beta, const at::Tensor& w_fb,
                                    const at::Tensor& b_fb, const at::Tensor& m_init,
                                    int64_t n_heads, bool gradient_rule, bool tanh_act,
                                    double eps, bool store, bool answers);
std::vector<at::Tensor> mnm_backward(
    const at::Tensor& g_hs, const at::Tensor& g_reads, const at::Tensor& g_after,
    const at::Tensor& g_before, const at::Tensor& g_values, const at::Tensor& g_beta,
    const at::Tensor& g_c_final, const at::Tensor& g_m_final, const at::Tensor& gates_x,
    const at::Tensor& keep, const at::Tensor& m0, const at::Tensor& last_post,
    const at::Tensor& u_in, const at::Tensor& c_in, const at::Tensor& write_acts,
    const at::Tensor& write_scaled, const at::Tensor& read_acts, const at::Tensor& ended,
    const at::Tensor& gates_all, const at::Tensor& e_all, const at::Tensor& raw_all,
    const at::Tensor& hs, const at::Tensor& w_rec, const at::Tensor& w_int,
    const at::Tensor& b_int, const at::Tensor& w_beta, const at::Tensor& b_beta,
    const at::Tensor& w_fb, const at::Tensor& b_fb, const at::Tensor& m_init, int64_t n_heads,
    bool gradient_rule, bool tanh_act, double eps, double recon_scale);
std::vector<at::Tensor> mnm_forward_parts(const at::Tensor& gates_x, const at::Tensor& keep,
                                          const at::Tensor& h0, const at::Tensor& c0,
                                          const at::Tensor& r0, const at::Tensor& m0,
                                          const at::Tensor& w_rec, const at::Tensor& w_int,
                                          const at::Tensor& b_int, const at::Tensor& w_beta,
                                          const at::Tensor& b_beta, const at::Tensor& w_fb,
                                          const at::Tensor& b_fb, const at::Tensor& m_init,
                                          int64_t n_heads, bool gradient_rule, bool tanh_act,
                                          double eps, bool store, bool answers,
                                          int64_t parts);
std::vector<at::Tensor> mnm_backward_parts(
    const at::Tensor& g_hs, const at::Tensor& g_reads, const at::Tensor& g_after,
    const at::Tensor& g_before, const at::Tensor& g_values, const at::Tensor& g_beta,
    const at::Tensor& g_c_final, const at::Tensor& g_m_final, const at::Tensor& gates_x,
    const at::Tensor& keep, const at::Tensor& m0, const std::vector<at::Tensor>& saved,
    const at::Tensor& hs, const at::Tensor& w_rec, const at::Tensor& w_int,
    const at::Tensor& b_int, const at::Tensor& w_beta, const at::Tensor& b_beta,
    const at::Tensor& w_fb, const at::Tensor& b_fb, const at::Tensor& m_init, int64_t n_heads,
    bool gradient_rule, bool tanh_act, double eps, double recon_scale);

// summary.cpp: the mean of each tensor, then the largest element of the last (NaN if any is).
std::vector<double> summary_statistics(const std::vector<at::Tensor>& tensors);

// lstm_sequence.cpp: an LSTM with episode resets (see there).
std::vector<at::Tensor> lstm_forward(const at::Tensor& gates_x, const at::Tensor& keep,
                                     const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_hh, bool store, int64_t parts);
std::vector<at::Tensor> lstm_backward(const at::Tensor& g_hs, const at::Tensor& g_c_final,
                                      const at::Tensor& keep, const at::Tensor& h0,
                                      const at::Tensor& c0, const at::Tensor& w_hh,
                                      const at::Tensor& hs, const at::Tensor& cs,
                                      const at::Tensor& acts, int64_t parts);

// gru_sequence.cpp: a GRU with episode resets (see there).
std::vector<at::Tensor> gru_forward(const at::Tensor& gates_x, const at::Tensor& keep,
                                    const at::Tensor& h0, const at::Tensor& w_hh,
                                    const at::Tensor& b_hh, bool store);
std::vector<at::Tensor> gru_backward(const at::Tensor& g_hs, const at::Tensor& keep,
                                     const at::Tensor& h0, const at::Tensor& w_hh,
                                     const at::Tensor& hs, const at::Tensor& acts);

// linear.cpp: a Linear layer by the hand-written products of dense_products.h (see there).
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, int64_t parts);
std::vector<at::Tensor> linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                        const at::Tensor& weight, bool needs_x, bool needs_weight,
                                        bool needs_bias, int64_t parts);

// reconstruction.cpp: the memory's reconstruction errors, after and before the writes, [2, ...]
// for answers and values [..., H, D] (see there).
at::Tensor reconstruction_errors(const at::Tensor& after, const at::Tensor& before,
                                 const at::Tensor& values);

}  // namespace mnm_rl
