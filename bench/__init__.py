"""Side-by-side measurements of jaxft and PyTorch + transformers (see README.md)."""
