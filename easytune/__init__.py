"""easytune: JAX/Flax fine-tuning of LLMs."""
