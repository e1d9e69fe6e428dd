"""Checkpoint formats: locating a checkpoint, reading its weights (safetensors, msgpack,
pickles, GGUF), building and exporting models, PEFT adapters."""
