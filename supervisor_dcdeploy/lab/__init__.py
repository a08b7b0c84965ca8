"""The lab: everything that builds a local or namespace data center around the product.

ZooKeeper servers (``zkserver``), supervisord hosts (``hostenv``), the local data center
(``localdc``), network namespaces (``netns``), the sample service (``sample``), the namespace
testbed (``testbed``), the swarm lab (``swarmlab``), the store fuzzer (``storefuzz``) and the
``dcdeploy demo``. Used by the tests, the benches and the ``demo``/``testbed`` CLI verbs only;
the runtime (agent, store, fetch, p2p, the other CLI verbs) never imports it
(``tests/test_lab_boundary.py`` checks that).
"""
