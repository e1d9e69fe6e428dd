"""jaxft: fine-tune pretrained Hugging Face models with JAX and Flax NNX."""

from jaxft.aot import topology as _topology

__version__ = "0.1.0"

# Before anything starts JAX: an installed libtpu (for TPU compiles on this
# machine) must not print warnings at every start-up where no TPU is attached.
_topology.quiet_without_tpu()
