"""The corosync membership provider: views, quorum and node names from corosync.

:mod:`.binding` is the ctypes binding to libcpg/libquorum/libvotequorum/libcmap,
:mod:`.membership` the sans-IO core that turns CPG configuration changes,
CPG messages and quorum notifications into the same events as storaged's own
:class:`~storaged.cluster.membership.Membership`, and :mod:`.shell` the
asyncio glue that feeds it from the libraries' file descriptors.
"""
