"""`experiments.kernel_resources` on CPU: the op lowered for CUDA without a GPU, one Triton module per kernel."""

import pytest

from experiments import kernel_resources


def test_forward_and_backward_kernels_lower_for_cuda(tmp_path):
    forward = kernel_resources.op_kernels((2, 256, 3, 64), backward=False, overrides={})
    assert [k["name"] for k in forward] == ["delta_rule_wy_inverse", "delta_rule_chunk_fwd_from_t"]
    assert forward[0]["grid"] == (4, 2, 3)          # one program per (chunk, batch, head)
    assert forward[1]["grid"] == (2, 2, 3)          # one per (V-tile, batch, head): 32-wide tiles for few heads
    assert all("tt.func" in k["ir"] for k in forward)
    # the launches the op passes (2-warp inverse, 3-stage scan for 16-bit inputs), not Triton's defaults
    assert [(k["num_warps"], k["num_stages"]) for k in forward] == [(2, 1), (4, 3)]
    unfolded = kernel_resources.op_kernels((2, 256, 3, 64), backward=False, overrides={"fold_wu": False})
    assert [k["name"] for k in unfolded] == ["delta_rule_wy_prepare", "delta_rule_chunk_fwd"]
    for fold in (True, False):   # the diagonal inverses by products: no scratch output, no gathers
        doubling = kernel_resources.op_kernels((2, 256, 3, 64), backward=False,
                                               overrides={"fold_wu": fold, "doubling_inverse": True})
        assert doubling[0]["ir"].count("tt.store") < (forward if fold else unfolded)[0]["ir"].count("tt.store")
        assert "gpu.barrier" not in doubling[0]["ir"]
    kernel_resources.main(["--shape", "1x128x2x32", "--backward", "--ir-only", "--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00_delta_rule_wy_inverse.ttir", "01_delta_rule_chunk_fwd_from_t.ttir",
                     "02_delta_rule_wy_apply.ttir", "03_delta_rule_chunk_states.ttir",
                     "04_delta_rule_chunk_state_grads.ttir", "05_delta_rule_chunk_dqkw.ttir",
                     "06_delta_rule_wy_bwd.ttir"]


def test_lowering_is_put_back():
    """After the hooked lowering, pallas_call lowers through the same rules as before (no CUDA rule
    left registered over the common one, which decides on interpret mode)."""
    from jax._src.interpreters import mlir
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas import pallas_call
    from jax._src.pallas.triton import pallas_call_registration as registration

    def rules():
        return (registration.pallas_call_lowering, registration.lowering.lower_jaxpr_to_triton_module,
                mlir._platform_specific_lowerings["cuda"].get(pallas_call.pallas_call_p),
                mlir._lowerings.get(pallas_call.pallas_call_p),
                dict(getattr(pallas_core, "_backend_lowering_rules", {})))

    before = rules()
    kernel_resources.op_kernels((1, 64, 1, 16), backward=False, overrides={})
    assert rules() == before


def test_rejects_two_shapes(capsys):
    with pytest.raises(SystemExit):
        kernel_resources.main(["--shape", "1x128x2x32,1x64x2x32", "--ir-only"])
    assert "--shape takes one B x T x H x D shape" in capsys.readouterr().err
