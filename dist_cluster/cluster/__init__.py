"""The clustering stage: PCA-whitening, sharded k-means, hierarchical k-means with all_to_all routing.

    from dist_cluster.cluster import run_clustering, load_cluster_state
"""
from .hierarchy import HierResult, hierarchical_kmeans
from .kmeans import KMeansResult, kmeans
from .nmi import distributed_nmi
from .pca import PCAWhitening, fit_pca
from .stage import ClusterState, load_cluster_state, run_clustering

__all__ = ["ClusterState", "HierResult", "KMeansResult", "PCAWhitening", "distributed_nmi", "fit_pca",
           "hierarchical_kmeans", "kmeans", "load_cluster_state", "run_clustering"]
