"""Experiments over many runs: ablations under a compute budget, result tables, run reports.

- `budgets`: named sets of overrides that cap a run's cost (`small`, `medium`, `large`, `full`).
- `ablation`: train configs x seeds into `OUT/<config>/seed-<k>`, resumable; aggregate into
  `results.csv`, `results.md` and `results.png`.
- `report`: one run's `report.html` (config, curves, confusion matrices, scatter, histograms).
"""
