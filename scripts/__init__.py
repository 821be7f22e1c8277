"""The jobs layer: command-line tools over run directories (launch, status, slurm_render, report export,
landscape, lm_eval_job). Everything below (data, eval_and_metrics, training) may be imported from here,
nothing here from there."""
