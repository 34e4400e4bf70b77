"""dist_cluster: DeeperCluster (rotation x hierarchical k-means) pre-training at cluster scale."""
__version__ = "0.1.0"
