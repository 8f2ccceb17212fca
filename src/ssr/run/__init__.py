"""Run infrastructure: everything a long training run needs that is not the algorithm.

One place each for resume resolution (`resume`), pre-emption and requeue (`preemption`), RNG
states in checkpoints (`rng`), the trainer with atomic checkpoint files (`trainer`), the wandb
logger (`wandb`), debug panels (`panels`), the progress bar (`progress`), console hygiene
(`console`) and the CLI error convention (`cli`). The algorithm never imports from here: only
entry points do (the CLIs, and `ssr.uda.sam_cache` among them).
"""
