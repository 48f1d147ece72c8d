"""Launch helpers: Slurm / torchrun scripts (shell) and the Hydra callback used by the submitit launcher."""
