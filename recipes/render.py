from fit3d_hf.cli import run_command

run_command("render")
