"""Job launchers: ``python -m dinov2.run.submit`` runs training on SLURM (or locally) through submitit."""
