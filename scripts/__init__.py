"""Command-line tools: launch.py (Slurm fan-out), status.py (run progress), slurm_render.py, local_slurm.sh."""
