"""Control operations for virtual services (``storaged lb``), live and offline.

The ipvsadm commands map one to one: -A lb_add_service, -E lb_edit_service,
-D lb_delete_service, -a/-e/-d lb_{add,edit,delete}_real, -L lb_list,
-C lb_clear, -R lb_restore (replace everything, in one transaction).
"""

from __future__ import annotations

from typing import Any

from storaged.control.ops import ConfigError, _op
from storaged.lb.records import VirtualService
from storaged.state import Txn
from storaged.state.validate import normalize_portal


def _norm(vip: str) -> str:
    return normalize_portal(vip)


def _get(txn: Txn, vip: str) -> VirtualService:
    svc = txn.get(VirtualService, _norm(vip))
    if svc is None:
        raise ConfigError(f"no virtual service {vip}")
    return svc


def _put(txn: Txn, svc: VirtualService) -> dict[str, Any]:
    svc.validate()
    txn.put(svc)
    return svc.to_dict()


@_op()
def lb_add_service(txn: Txn, vip: str, scheduler: str = "wlc", persistent: int = 0,
                   netmask: str = "255.255.255.255", pe: str = "",
                   flags: list[str] | None = None, redirect: str = "temporary"
                   ) -> dict[str, Any]:
    """ipvsadm -A: a new virtual service on portal ``vip``."""
    svc = VirtualService(vip=vip, scheduler=scheduler, persistent=persistent,
                         netmask=netmask, pe=pe, flags=list(flags or []), redirect=redirect)
    svc.validate()
    if txn.get(VirtualService, svc.vip) is not None:
        raise ConfigError(f"virtual service {svc.vip} already exists")
    return _put(txn, svc)


@_op()
def lb_edit_service(txn: Txn, vip: str, scheduler: str | None = None,
                    persistent: int | None = None, netmask: str | None = None,
                    pe: str | None = None, flags: list[str] | None = None,
                    redirect: str | None = None) -> dict[str, Any]:
    """ipvsadm -E: change a virtual service (only what is given)."""
    svc = _get(txn, vip)
    for name, value in (("scheduler", scheduler), ("persistent", persistent),
                        ("netmask", netmask), ("pe", pe), ("flags", flags),
                        ("redirect", redirect)):
        if value is not None:
            setattr(svc, name, value)
    return _put(txn, svc)


@_op()
def lb_delete_service(txn: Txn, vip: str) -> dict[str, Any]:
    """ipvsadm -D."""
    svc = _get(txn, vip)
    txn.delete(VirtualService, svc.vip)
    return {"vip": svc.vip}


@_op()
def lb_add_real(txn: Txn, vip: str, real: str, weight: int = 1, upper: int = 0,
                lower: int = 0) -> dict[str, Any]:
    """ipvsadm -a: add real server ``real`` (a node's portal) to a service."""
    svc = _get(txn, vip)
    portal = normalize_portal(real)
    if any(r["portal"] == portal for r in svc.reals):
        raise ConfigError(f"real server {portal} is already in {svc.vip}")
    svc.reals.append({"portal": portal, "weight": weight, "upper": upper, "lower": lower})
    return _put(txn, svc)


@_op()
def lb_edit_real(txn: Txn, vip: str, real: str, weight: int | None = None,
                 upper: int | None = None, lower: int | None = None) -> dict[str, Any]:
    """ipvsadm -e: change a real server's weight or thresholds."""
    svc = _get(txn, vip)
    portal = normalize_portal(real)
    for r in svc.reals:
        if r["portal"] == portal:
            for name, value in (("weight", weight), ("upper", upper), ("lower", lower)):
                if value is not None:
                    r[name] = value
            return _put(txn, svc)
    raise ConfigError(f"no real server {portal} in {svc.vip}")


@_op()
def lb_delete_real(txn: Txn, vip: str, real: str) -> dict[str, Any]:
    """ipvsadm -d."""
    svc = _get(txn, vip)
    portal = normalize_portal(real)
    kept = [r for r in svc.reals if r["portal"] != portal]
    if len(kept) == len(svc.reals):
        raise ConfigError(f"no real server {portal} in {svc.vip}")
    svc.reals = kept
    return _put(txn, svc)


@_op(mutating=False)
def lb_list(txn: Txn, vip: str | None = None) -> dict[str, Any]:
    """ipvsadm -L: every virtual service (or one)."""
    if vip is not None:
        return {"services": [_get(txn, vip).to_dict()]}
    return {"services": [s.to_dict() for s in txn.list(VirtualService)]}


@_op()
def lb_clear(txn: Txn) -> dict[str, Any]:
    """ipvsadm -C: delete every virtual service."""
    n = 0
    for s in txn.list(VirtualService):
        txn.delete(VirtualService, s.vip)
        n += 1
    return {"deleted": n}


@_op()
def lb_restore(txn: Txn, services: list[dict[str, Any]]) -> dict[str, Any]:
    """ipvsadm -R: replace every virtual service with ``services`` (atomic)."""
    records = [VirtualService.from_dict(s) for s in services]
    keys = [r.vip for r in records]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"virtual service {dup[0]} is defined twice")
    lb_clear.__wrapped__(txn)  # type: ignore[attr-defined]
    for r in records:
        txn.put(r)
    return {"restored": len(records)}
