"""Training: optimizer (optim), pure train/eval steps (step), checkpoints (checkpoint), the loop (loop)."""
