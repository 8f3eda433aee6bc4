"""Distil an LLM + guard-model system into a soft prompt, in pure MLX."""

__version__ = "0.1.0"
