"""Where cluster state comes from. Each source feeds typed objects into ClusterState."""
