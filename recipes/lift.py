"""Stage I recipe: `accelerate launch --config_file recipes/configs/accelerate_cpu_2proc.yaml recipes/lift.py --help`."""

from fit3d_hf.cli import run_command

if __name__ == "__main__":
    run_command("lift")
