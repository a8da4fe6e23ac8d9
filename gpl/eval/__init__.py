"""``gpl eval``: the paper's offline comparison on any dataset in the project's event format (docs/eval.md).

dataset.py loads a dataset directory, movielens.py builds one with the funnel simulator, anchor_sources.py /
pseudo.py make GPL's anchors and pseudo-labels with the labeler's code, methods.py holds the compared
methods and their shared training loop (over context.py, what every method of one dataset shares, and
teacher.py, the KD teacher), metrics.py the vectorised metrics, run.py the orchestration (label_quality.py
judges the labels each method adds, results.py summarises over seeds), report.py the table, results files
and plots.
"""
