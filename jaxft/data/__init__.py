"""Data: load datasets (files or hub), tokenize, and batch deterministically."""
