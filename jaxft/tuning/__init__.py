"""Which parameters train, and how fast: parameter paths, rules, LoRA, the trainable/frozen split, the optimizer."""
