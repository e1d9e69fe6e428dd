"""jaxft: fine-tune pretrained Hugging Face models with JAX and Flax NNX."""

from jaxft.aot import topology as _topology

__version__ = "0.1.0"

# Before anything starts JAX: where libtpu is installed (for TPU compiles on
# this machine) but no TPU is attached, it must neither print warnings at every
# start-up nor half-start a TPU backend (see aot/topology.quiet_without_tpu).
_topology.quiet_without_tpu()
