"""Launch helpers for easytune: Cloud TPU VMs and pod slices (see launch/tpu.py)."""
