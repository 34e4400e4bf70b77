"""CLUSTER: extract -> PCA-whitening -> hierarchical k-means (level 1, route, level 2) -> return.

    extract.py    trunk forward over the rank's shards: pre-ReLU features, keys
    pca.py        covariance by all_reduce, eigh once, whitening + L2
    kmeans.py     sharded Lloyd iterations (local E-step, all_reduce M-step), empty-cluster re-split
    route.py      all_to_all of rows to the ranks that own their super-cluster, in bounded rounds
    hierarchy.py  m super-clusters, then k/m sub-clusters inside each on its owners
    stage.py      one round of all that, its files in RUN/clusters/round_<r>/, and their readers
    nmi.py        NMI between two rounds' labels without gathering them; rows.py row access helpers
"""
