"""Evaluation of a run's frozen backbone and the run report.

    python launch/eval.py --run RUN --train data/fmnist/train --test data/fmnist/test
    python -m dist_cluster.evaluation.report --run RUN --train data/fmnist/train

metrics.py  pure functions on arrays (weighted kNN, NMI, AMI, Hungarian accuracy)
probes.py   linear probe (L-BFGS logistic regression), k-means on features
features.py backbone loading, distributed extraction + gather to rank 0, samples by key
evaluate.py the benchmark (eval.json / eval.md); report.py, figures.py, cam.py the HTML report
"""
from .metrics import ami, hungarian_accuracy, knn_predict, knn_top1, nmi, top1
from .probes import fit_linear_probe, kmeans_labels, linear_probe_top1

__all__ = ["ami", "hungarian_accuracy", "knn_predict", "knn_top1", "nmi", "top1", "fit_linear_probe",
           "kmeans_labels", "linear_probe_top1"]
