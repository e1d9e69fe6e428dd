"""roofline: hardware FLOPs per remat and trainable share; the MFU estimate's bounds."""

import pytest

from jaxft.aot import roofline
from jaxft.aot import topology


@pytest.mark.parametrize("trainable, remat, factor", [
    (1.0, "none", 1.0),        # 6 N: forward 2, activation grads 2, weight grads 2
    (1.0, "full", 8 / 6),      # + a second forward
    (1.0, "dots", 1.0),        # matmul outputs kept: no matmul recomputed
    (0.0, "none", 4 / 6),      # LoRA-like: no weight gradients for the frozen base
    (0.0, "full", 1.0),
])
def test_hardware_flops_follow_remat_and_the_trainable_share(trainable, remat, factor):
  assert roofline.hardware_flops(6e12, trainable_fraction=trainable, remat=remat) == \
      pytest.approx(6e12 * factor)


@pytest.mark.parametrize("trainable, remat", [(0.0, "none"), (1.0, "full"), (0.01, "dots")])
def test_mfu_never_exceeds_one_and_collectives_lower_it(trainable, remat):
  t = topology.parse("v5p-128")
  flops = 1e17
  alone = roofline.estimate(model_flops=flops, trainable_fraction=trainable, remat=remat,
                            collective_bytes=0, topology=t)
  busy = roofline.estimate(model_flops=flops, trainable_fraction=trainable, remat=remat,
                           collective_bytes=1e12, topology=t)
  assert 0 < busy.mfu < alone.mfu <= 1
  assert busy.collective_seconds == pytest.approx(1e12 / t.chip.ici_bytes_per_s)
  assert busy.step_seconds == pytest.approx(busy.compute_seconds + busy.collective_seconds)
