"""Training: the loop (loop) over the pure train/eval steps (step), built by setup; data windows (batches),
optimizer (optim), checkpoints and resume (checkpoint), logs (metrics, console, curves), signals and multi-host
barriers (guards), ``--dry-run`` (dry_run), ``easytune lr`` (lr), the compilation cache (compile_cache)."""
