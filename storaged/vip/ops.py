"""Control operations for floating addresses (``storaged vip``), live and offline.

``vip_add`` / ``vip_del`` change the stored config; the daemon's reconcile
then hands the new list to its :class:`~storaged.vip.service.VipService`.
``vip_ls`` offline lists the configuration; the running daemon answers it
with the live state (holder, state, history) instead.
"""

from __future__ import annotations

from typing import Any

from storaged.control.ops import ConfigError, _op
from storaged.state import Txn
from storaged.vip.records import FloatingAddress, parse_address


@_op()
def vip_add(txn: Txn, address: str, dev: str, preference: list[int] | None = None,
            preference_delay_ms: int = 500, garp_count: int = 5, garp_interval_ms: int = 200,
            reannounce_s: int = 0, lockspace: str = "default",
            require_synced_clock: bool = False) -> dict[str, Any]:
    """A new floating address ``ADDRESS/PREFIX`` on interface ``dev``."""
    vip = FloatingAddress(address=address, dev=dev, preference=list(preference or []),
                          preference_delay_ms=preference_delay_ms, garp_count=garp_count,
                          garp_interval_ms=garp_interval_ms, reannounce_s=reannounce_s,
                          lockspace=lockspace, require_synced_clock=require_synced_clock)
    vip.validate()
    if txn.get(FloatingAddress, vip.key) is not None:
        raise ConfigError(f"floating address {vip.ip} already exists (storaged vip del {vip.ip} "
                          "first to change it)")
    txn.put(vip)
    return vip.to_dict()


@_op()
def vip_del(txn: Txn, address: str) -> dict[str, Any]:
    """Delete a floating address (``ADDRESS`` or ``ADDRESS/PREFIX``); its holder drops it."""
    if not isinstance(address, str) or not address.strip():
        raise ConfigError("vip_del needs an address")
    ip = str(parse_address(address).ip) if "/" in address else address.strip()
    vip = txn.get(FloatingAddress, ip)
    if vip is None:
        raise ConfigError(f"no floating address {address}")
    txn.delete(FloatingAddress, vip.key)
    return {"address": vip.address}


@_op(mutating=False)
def vip_ls(txn: Txn) -> dict[str, Any]:
    """Configured floating addresses (the daemon answers with their live state)."""
    return {"live": False, "vips": [v.to_dict() for v in txn.list(FloatingAddress)]}
