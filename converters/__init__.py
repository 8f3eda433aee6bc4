"""Converters from other checkpoint formats to MLX (``hf_to_mlx``: Hugging Face -> MLX)."""
