"""Cluster membership, the shard map and its placement, and the etcd interface they use."""
