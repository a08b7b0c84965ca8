"""Peer-to-peer release distribution (issue #3).

Every host runs a transmission-daemon (``daemon``) and, inside its agent, an HTTP tracker on
loopback (``tracker``) that answers announces from the coordination store, same rack first.
The build host makes a private torrent (``torrent``) and seeds it (``seed``); each host's agent
fetches through its own daemon (``swarm``), verifies the whole-file sha256 and warms the
release into the page cache (``warm``) before it joins the ready-to-roll queue.

See docs/distribution.md for the design, the settings that matter and measured numbers.
"""
