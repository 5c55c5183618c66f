"""Floating portal addresses: one quorate cluster node holds each address (IPaddr2-like).

* :mod:`storaged.vip.records` - the ``FloatingAddress`` record (config section ``vips``);
* :mod:`storaged.vip.core` - the sans-IO decision logic (who adds, announces, drops);
* :mod:`storaged.vip.arp` - gratuitous ARP frames (RFC 5227 announcements);
* :mod:`storaged.vip.net` - the kernel shell: pyroute2 addresses, AF_PACKET sends;
* :mod:`storaged.vip.service` - the asyncio shell on a running cluster node;
* :mod:`storaged.vip.ops` and :mod:`storaged.vip.cli` - ``storaged vip add|ls|del``.
"""
