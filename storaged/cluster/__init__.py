"""Cluster membership, quorum and fencing over ZeroMQ (see docs/cluster.md).

``config``: records in the state store; ``membership`` and ``quorum``: the
sans-IO cores; ``fencing``: pluggable fencers; ``node``: the asyncio/ZeroMQ
shell that also hosts the DLM lockspaces; ``cli``: ``storaged cluster`` and
``storaged lock``.
"""
