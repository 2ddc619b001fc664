#!/usr/bin/env bash
# Run the paper's ablation grid (Tables 2-3) as named DVC experiments, one per variant of
# ttds_core/variants.py, then compare them.
#
#   scripts/grid.sh --dry-run            # print the dvc commands only
#   scripts/grid.sh                      # every variant, one by one, in the workspace
#   scripts/grid.sh --variant TTSS --variant TTDS-HO   # --force: re-run every stage, overwrite same-name experiments
#   scripts/grid.sh --queue              # queue them all, then `dvc exp run --run-all`
#
# Commit params.yaml, dvc.lock and metrics/ first: the workspace grid resets them between
# variants and restores the baseline at the end. `--queue` runs copies of the repository
# under .dvc/tmp/exps, where the default relative data.root (../shared/...) does not
# resolve: use it only with data inside the repository or at an absolute path. Afterwards:
#   dvc exp show --md --only-changed ; dvc metrics diff --all --md ; ttds report
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
exec python -m ttds_core.cli grid "$@"
