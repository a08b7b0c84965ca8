"""Multi-host testbed: hosts in network namespaces, a 3-node ZooKeeper ensemble, faults,
a prober and store recorder, and a checker of docs/design.md §5 on the recorded history."""
