#!/usr/bin/env bash
# Run the paper's ablation grid (Tables 2-3) as named DVC experiments, one per variant of
# ttds_core/variants.py, then compare them.
#
#   scripts/grid.sh --dry-run            # print the dvc commands only
#   scripts/grid.sh                      # queue all variants, then `dvc exp run --run-all`
#   scripts/grid.sh --variant TTDS --variant TTDS-HO --force
#
# Queued experiments start from the last git commit (plus changes to tracked files):
# commit first; untracked files do not reach them. Afterwards:
#   dvc exp show --md --only-changed ; dvc metrics diff --all --md ; ttds report
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
exec python -m ttds_core.cli grid "$@"
