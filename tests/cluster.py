"""Test-side names for the local data center (see supervisor_dcdeploy.localdc)."""

from supervisor_dcdeploy.localdc import Cluster, Prober, Sample, get_version, wait_for

__all__ = ["Cluster", "Prober", "Sample", "get_version", "wait_for"]
