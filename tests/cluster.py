"""Test-side names for the local data center (see supervisor_dcdeploy.lab.localdc)."""

from supervisor_dcdeploy.lab.localdc import Cluster, Prober, Sample, get_version, wait_for

__all__ = ["Cluster", "Prober", "Sample", "get_version", "wait_for"]
