"""Command line of ``diffusion_policy.common.aggregate_metrics`` (the paper's numbers from runs' logs).

    python -m benchmarks.aggregate_metrics outputs/seed42 outputs/seed43 outputs/seed44 --label "state CNN"
    python -m benchmarks.aggregate_metrics run/logs.json.txt --header --json

For a whole sweep (grouped by everything but ``training.seed``, failed jobs named), see
``python -m diffusion_policy.common.sweep_metrics --help``.
"""

from __future__ import annotations

import sys

from diffusion_policy.common.aggregate_metrics import main

if __name__ == "__main__":
    sys.exit(main())
