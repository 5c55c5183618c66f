"""fence_storaged ``method=pr``: fence_scsi's SCSI-3 persistent reservation
fencing, through storaged's own iSCSI initiator (no sg_persist, no kernel
initiator).

The LUNs are ``devices``: iscsi:// URLs (docs/initiator.md).  A node's key
is ``key`` when given, else derived as fence_scsi derives it: the first
four hex digits of MD5(cluster name) followed by the node id as four
decimal digits (``key_value=id``, the id from ``plug`` when numeric or from
``node_ids``), or by the first four hex digits of MD5(node name)
(``key_value=hash``).

* ``on`` (unfencing, run on the node itself): REGISTER AND IGNORE EXISTING
  KEY with the node's key on every device, and RESERVE WRITE EXCLUSIVE -
  REGISTRANTS ONLY where no reservation exists; the key is saved in
  ``key_file`` (fence_scsi's ``/var/run/cluster/fence_scsi.key``) as the
  key this host fences others with.
* ``off``: the fencing host's key (``local_node``, or the saved key file)
  registers this session's I_T nexus, then PREEMPT AND ABORT removes every
  registration of the victim's key (SPC-4 §5.14.11.2.4: its tasks are
  aborted, its next write gets RESERVATION CONFLICT).  A host cannot fence
  its own key.
* ``status``: READ KEYS on every device: ON while the key is registered
  on any of them.
"""

from __future__ import annotations

import hashlib
import logging
import os

from fence.options import UsageError

log = logging.getLogger("fence")

DEFAULT_KEY_FILE = "/var/run/cluster/fence_storaged.key"


def _redact(url: str) -> str:
    from storaged.block.open import redact
    return redact(url)


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("ascii"), usedforsecurity=False).hexdigest()


def node_key(opts: dict[str, str], node: str) -> int:
    """The reservation key of cluster node ``node``, as fence_scsi's generate_key."""
    if opts.get("key"):
        try:
            return int(opts["key"], 16)
        except ValueError:
            raise UsageError(f"Failed: key must be hexadecimal, got {opts['key']!r}") from None
    cluster = opts.get("cluster_name")
    if not cluster:
        raise UsageError("Failed: method=pr needs cluster_name (or key) to derive keys")
    if opts.get("key_value", "id") == "hash":
        return int(_md5(cluster)[:4] + _md5(node)[:4], 16)
    from storaged.initiator.device import fence_scsi_key
    return fence_scsi_key(cluster, node_id(opts, node))


def node_id(opts: dict[str, str], node: str) -> int:
    """``node`` itself when numeric, else its id in ``node_ids`` (``name=id,...``),
    standing in for the corosync nodelist fence_scsi reads."""
    if node.isdigit():
        return int(node)
    for item in (opts.get("node_ids") or "").split(","):
        name, _, nid = item.strip().partition("=")
        if name == node and nid.strip().isdigit():
            return int(nid)
    raise UsageError(f"Failed: unable to find the node id of {node!r} (give node_ids "
                     "name=id,... or key_value=hash)")


def device_urls(opts: dict[str, str]) -> list[str]:
    urls = [u.strip() for u in (opts.get("devices") or "").split(",") if u.strip()]
    if not urls:
        raise UsageError("Failed: method=pr needs devices (iscsi:// URLs of the shared LUNs)")
    for u in urls:
        if not u.startswith("iscsi://"):
            raise UsageError(f"Failed: device {u!r} is not an iscsi:// URL")
    return urls


def problems(opts: dict[str, str]) -> list[str]:
    """What validate-all reports for method=pr."""
    errors = []
    for check in (lambda: device_urls(opts),
                  lambda: node_key(opts, opts.get("plug") or "1")):
        try:
            check()
        except UsageError as e:
            errors.append(str(e))
    if opts.get("key_value", "id") not in ("id", "hash"):
        errors.append(f"Parse error: Option 'key_value' must be one of id, hash, got "
                      f"{opts['key_value']!r}")
    return errors


class PrMethod:
    """PR fencing on every LUN of ``devices`` (one instance for all of them)."""

    def __init__(self, opts: dict[str, str], failure: type[Exception]) -> None:
        self.opts = opts
        self.failure = failure
        self.urls = device_urls(opts)
        self.timeout = float(opts.get("power_timeout", "20"))
        self.login_timeout = float(opts.get("login_timeout", "5"))
        self.devs: list = []
        for url in self.urls:
            self.devs.append(self._open(url))

    def _open(self, url: str):  # noqa: ANN202 - RemoteBlockDevice, imported lazily
        from storaged.block.base import BlockDeviceError
        from storaged.initiator.device import RemoteBlockDevice
        try:
            return RemoteBlockDevice(url, login_timeout=self.login_timeout,
                                     replacement_timeout=self.timeout)
        except (BlockDeviceError, ValueError) as e:
            log.error("%s: %s", _redact(url), e)
            self.close()
            msg = "Connection timed out" if "timed out" in str(e) else \
                "Unable to connect/login to fencing device"
            raise self.failure(msg) from None

    def _keys(self, dev) -> list[int]:  # noqa: ANN001
        from storaged.block.base import BlockDeviceError
        try:
            return dev.read_keys()
        except BlockDeviceError as e:
            log.error("READ KEYS failed: %s", e)
            raise self.failure("Connection lost") from None

    def ping(self) -> None:
        for dev in self.devs:
            self._keys(dev)

    def host_key(self) -> int:
        """The key of the host running the agent: ``local_node``, else the key file."""
        if self.opts.get("local_node"):
            opts = {k: v for k, v in self.opts.items() if k != "key"}
            return node_key(opts, self.opts["local_node"])
        path = self.opts.get("key_file") or DEFAULT_KEY_FILE
        try:
            with open(path) as f:
                return int(f.readline().strip(), 16)
        except (OSError, ValueError):
            raise UsageError(f'Failed: Cannot open file "{path}" (unfence this host first, '
                             "or give local_node)") from None

    def on(self, node: str) -> None:
        from storaged.block.base import BlockDeviceError
        key = node_key(self.opts, node)
        failed = 0
        for url, dev in zip(self.urls, self.devs, strict=True):
            try:
                dev.unfence(key)
            except BlockDeviceError as e:
                log.error("unfencing %x on %s failed: %s", key, _redact(url), e)
                failed += 1
                continue
            if key not in self._keys(dev):
                failed += 1
        if failed:
            raise self.failure(f"Failed to verify {failed} device(s)")
        path = self.opts.get("key_file") or DEFAULT_KEY_FILE
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(f"{key:x}\n")
        except OSError as e:
            raise UsageError(f'Failed: Cannot open file "{path}": {e.strerror}') from None

    def off(self, node: str) -> None:
        from storaged.block.base import BlockDeviceError
        victim, host = node_key(self.opts, node), self.host_key()
        if victim == host:
            raise UsageError("Failed: keys cannot be same. You can not fence yourself.")
        for url, dev in zip(self.urls, self.devs, strict=True):
            keys = self._keys(dev)
            if victim not in keys:
                continue
            if host not in keys:
                # fence_scsi's preempt from an unregistered host fails the same way:
                # a host that was fenced itself cannot fence back.
                raise self.failure(f"Failed: this host's key {host:x} is not registered "
                                   f"on {_redact(url)} (is this host fenced?)")
            try:
                dev.register(host)            # this session's nexus acts for the host
                dev.preempt(host, victim)     # PREEMPT AND ABORT, type WE-RO
            except BlockDeviceError as e:
                log.error("PREEMPT AND ABORT of %x on %s failed: %s", victim, _redact(url), e)
                raise self.failure(f"Failed: preempting key {victim:x}") from None

    def status(self, node: str) -> bool:
        """True when ``node``'s key is registered on no device (fenced)."""
        key = node_key(self.opts, node)
        return not any(key in self._keys(dev) for dev in self.devs)

    def list(self) -> dict[str, bool]:
        """Nodes of ``node_ids`` (fenced or not), and unknown registered keys in hex."""
        keys = {k for dev in self.devs for k in self._keys(dev)}
        out: dict[str, bool] = {}
        names = [i.partition("=")[0].strip() for i in
                 (self.opts.get("node_ids") or "").split(",") if "=" in i]
        known = set()
        for name in names:
            k = node_key({kk: v for kk, v in self.opts.items() if kk != "key"}, name)
            known.add(k)
            out[name] = k not in keys
        for k in sorted(keys - known):
            out[f"{k:x}"] = False
        return out

    def close(self) -> None:
        for dev in self.devs:
            dev.close()
        self.devs = []
