"""DVC stage `inputs`: reads params.yaml, writes its outs (see dvc.yaml)."""

from ttds_core.cli import run_stage

if __name__ == "__main__":
    run_stage("inputs")
