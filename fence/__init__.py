"""Fence agents for storaged (fence-agents conventions, usable by pacemaker).

``fence_storaged`` (:mod:`fence.storaged_agent`) fences a cluster node at the
SAN, on one or more storaged storage nodes, through their authenticated
management endpoint (:mod:`fence.client`).
"""
