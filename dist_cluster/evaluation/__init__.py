"""Evaluation of a run's frozen backbone and the run report.

    python launch/eval.py --run RUN --train data/fmnist/train --test data/fmnist/test
    python -m dist_cluster.evaluation.report --run RUN --train data/fmnist/train
    python launch/compare.py RUN [RUN ...]

metrics.py  pure functions on arrays (weighted kNN, NMI, AMI, Hungarian accuracy)
probes.py   linear probe (L-BFGS logistic regression), k-means on features
features.py backbone loading, distributed extraction, rows sent to the ranks that need them, samples by key
tasks.py    the probes as tasks spread over the ranks; stages.py one line per stage, progress bars
evaluate.py the benchmark (eval.json / eval-<name>.json, evalsets.py); report.py, figures.py, cam.py
            the HTML report; compare.py several runs side by side
"""
