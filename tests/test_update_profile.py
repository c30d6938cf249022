"""benchmarks/update_profile.py: reading perf's report and grouping its symbols."""

from __future__ import annotations

import os

import pytest
from benchmark_scripts import load_script

# Lines as `perf report --no-children --sort dso,symbol -g none --stdio` writes them: padded
# columns, sometimes two more columns of dashes after the symbol.
REPORT = """\
# Samples: 31K of event 'cpu-clock:ppp'
#
    19.65%  libtorch_cpu.so       [.] mkl_blas_def_sgemm_kernel_0_zen              -      -
     6.82%  libtorch_cpu.so       [.] mkl_blas_def_sgemm_scopy_right16_bdz
     5.49%  mnm_rl_sequence.so    [.] mnm_rl::(anonymous namespace)::rank_update<float>
     4.46%  libtorch_cpu.so       [.] at::native::direct_copy_kernel(at::TensorIteratorBase&)
     1.46%  libpython3.11.so.1.0  [.] _PyEval_EvalFrameDefault
     1.20%  mnm_rl_policy_step.so [.] (anonymous namespace)::encode
     0.90%  mnm_rl_grid_linear.so [.] (anonymous namespace)::grid_linear_backward
     0.50%  _multiarray_umath.cpython-311-x86_64-linux-gnu.so  [.] npy_fastrepeat
     0.33%  [kernel.kallsyms]     [k] _raw_spin_unlock_irqrestore                  -      -
"""


@pytest.fixture(scope="module")
def update_profile():
    return load_script("update_profile")


def test_report_lines_give_symbol_and_share(update_profile):
    rows = update_profile.parse_report(REPORT)
    assert rows[0] == ("libtorch_cpu.so mkl_blas_def_sgemm_kernel_0_zen", 19.65)
    assert rows[2] == ("mnm_rl_sequence.so mnm_rl::(anonymous namespace)::rank_update<float>", 5.49)
    assert rows[-1] == ("[kernel.kallsyms] _raw_spin_unlock_irqrestore", 0.33)
    assert rows[-2] == ("_multiarray_umath.cpython-311-x86_64-linux-gnu.so npy_fastrepeat", 0.5)
    assert len(rows) == 9


def test_groups_add_up_their_symbols(update_profile):
    shares = update_profile.group_shares(update_profile.parse_report(REPORT))
    assert shares == {
        "mkl multiply": 19.65,
        "mkl packing": 6.82,
        "fused kernels' own code": 5.49,
        "compiled rollout step": 1.20,
        "other mnm_rl kernels": 0.90,
        "aten copies": 4.46,
        "numpy": 0.50,
        "python interpreter": 1.46,
    }


def test_a_configs_variant_suffix_takes_effect(update_profile, monkeypatch):
    """``--config lstm/autograd`` profiles the lstm agent with ``MNM_RL_EXPLICIT_BACKWARD=0``
    (the suffix used to be dropped without a word)."""
    monkeypatch.setenv("MNM_RL_EXPLICIT_BACKWARD", "1")  # restored after the test
    env, model = update_profile.build("lstm/autograd")
    try:
        assert os.environ["MNM_RL_EXPLICIT_BACKWARD"] == "0"
        assert model.policy.core_name == "lstm"
    finally:
        env.close()


def test_the_rollout_phase_collects_a_whole_rollout(update_profile):
    env, model = update_profile.build("mlp")
    try:
        model.learn(model.n_steps * model.n_envs)
        steps = model.num_timesteps
        update_profile.phase_runner(model, "rollout")()
        assert model.rollout_buffer.full
        assert model.num_timesteps == steps + model.n_steps * model.n_envs
        assert update_profile.phase_runner(model, "update") == model.train
    finally:
        env.close()
