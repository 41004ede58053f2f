"""JaggedDense's heads: the first layer as one [D, tasks x hidden] matrix laid out when the module is built, so a
package does not permute w1 on every call (a kernel of its own on the GPU: grc.aoti.model.JaggedDense.__init__)."""

from __future__ import annotations

import torch

from grc.aoti.model import JaggedDense, export_program
from grc.model.gr import GRModel
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS


def test_the_heads_compute_what_task_heads_compute() -> None:
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    dense = GRModel(cfg).dense.double().eval()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    with torch.no_grad():
        for p in dense.heads.parameters():
            p.normal_(0.0, 0.3, generator=gen)
        x = torch.randn(37, cfg.d_model, generator=gen, dtype=torch.float64)
        want = dense.heads(x)
        got = JaggedDense(dense).heads(x)
    assert want.shape == (37, len(cfg.tasks)) and want.std() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    # weights written after the module was built (a load, an update): the eager call lays them out again
    runner = JaggedDense(dense)
    with torch.no_grad():
        dense.heads.w1.mul_(-2.0)
        torch.testing.assert_close(runner.heads(x), dense.heads(x), rtol=1e-12, atol=1e-15)
        assert not torch.allclose(runner.heads(x), want)


def test_the_exported_program_never_reads_w1_in_its_parameter_layout() -> None:
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    program = export_program(GRModel(cfg).dense.eval(), torch.device("cpu"), torch.float32)
    w1 = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name.endswith("heads_w1"))
    laid_out = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "b_heads_w1")
    assert not w1.users and laid_out.users  # the parameter is unused; the buffer feeds the matmul
