"""The cluster lab: storage nodes and cluster nodes in network namespaces on one machine.

``storaged lab up`` builds it, ``lab status`` draws it, ``lab exec`` runs a
command inside a node, ``lab scenario`` runs a failure story with a
timeline, ``lab down`` removes everything it made.  :mod:`.plan` is the
sans-IO part (names, addresses, the ordered steps and their undo);
:mod:`.shell` runs the steps with ip(8), nsenter(1) and the storaged CLI and
records every resource in the lab's state store (:mod:`.records`) before it
creates it, so ``lab down`` also cleans up after a crash.
"""
