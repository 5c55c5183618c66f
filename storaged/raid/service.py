"""Arrays recorded in the state store, and the operations on them.

A :class:`RaidVolume` record (kind ``raid``) remembers each array's name,
uuid, level and member paths; the daemon assembles every recorded array at
start (:meth:`RaidService.reconcile`) and a Backstore of kind ``raid``
(``path`` = array name) exports one as a LUN.  :class:`RaidService` holds
the running arrays and implements the ``storaged raid`` verbs; the daemon
exposes them on its control socket as ``raid_<verb>`` operations, and the
CLI runs them in-process on the store when no daemon is running.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

from storaged.block.open import exists, normalize
from storaged.control.ops import ConfigError, _op, format_size, parse_size
from storaged.raid.array import RaidArray
from storaged.raid.layout import DEFAULT_CHUNK
from storaged.raid.manage import assemble, create, open_member
from storaged.raid.members import RaidError
from storaged.raid.records import RaidVolume
from storaged.state import Backstore, Store, Txn
from storaged.state.validate import normalize_name

log = logging.getLogger("storaged.raid")


class ArrayLun:
    """The view of an array a LogicalUnit gets: closing it does not stop the array."""

    def __init__(self, array: RaidArray, limit: int = 0) -> None:
        self.array = array
        self.limit = limit  # export at most this many bytes (0: the whole array)
        self.block_size = array.block_size
        self.read_only = False
        self.thin = False

    @property
    def size(self) -> int:
        return min(self.array.size, self.limit) if self.limit else self.array.size

    def refresh_size(self) -> int:
        return self.size

    def read(self, offset: int, length: int) -> bytes:
        return self.array.read(offset, length)

    def readinto(self, offset: int, buf: memoryview) -> int:
        return self.array.readinto(offset, buf)

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.array.write(offset, data, fua)

    def flush(self) -> None:
        self.array.flush()

    def discard(self, offset: int, length: int) -> None:
        self.array.discard(offset, length)

    def is_mapped(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.array.is_mapped(offset, length)

    def close(self) -> None:
        pass


def _abs(paths: list[str]) -> list[str]:
    """Absolute member paths; iscsi:// URLs as they are (storaged.block.open)."""
    return [normalize(p) for p in paths]


class RaidService:
    """Running arrays of one state store, and the admin verbs on them."""

    def __init__(self, store: Store, start_workers: bool = True) -> None:
        self.store = store
        self.arrays: dict[str, RaidArray] = {}
        self.start_workers = start_workers

    # ------------------------------------------------------------ records
    def _records(self) -> dict[str, RaidVolume]:
        with self.store.read() as txn:
            return {r.name: r for r in txn.list(RaidVolume)}

    def _record(self, name: str) -> RaidVolume:
        with self.store.read() as txn:
            rec = txn.get(RaidVolume, name)
        if rec is None:
            raise ConfigError(f"raid array {name!r} does not exist")
        return rec

    def _save(self, arr: RaidArray, rec: RaidVolume | None = None) -> RaidVolume:
        if rec is None:
            rec = RaidVolume(name=arr.name, uuid=arr.uuid, level=arr.geo.level)
        rec.uuid = arr.uuid
        rec.members = [m.path for m in sorted(arr.members, key=lambda m: m.dev_number)]
        rec.size = arr.size
        rec.speed_limit_min = arr.speed_limit_min
        rec.speed_limit_max = arr.speed_limit_max
        if arr.geo.level in (4, 5, 6):
            rec.stripe_cache_size = arr.stripe_cache_size
        rec.validate()
        with self.store.write() as txn:
            txn.put(rec)
        return rec

    def array(self, name: str) -> RaidArray:
        """The running array ``name``, assembling it from its record if needed."""
        arr = self.arrays.get(name)
        if arr is not None:
            return arr
        rec = self._record(name)
        try:
            arr = assemble(rec.members, name=None, uuid=bytes.fromhex(rec.uuid.replace(":", "")),
                           force=rec.force, start_worker=self.start_workers)
        except RaidError as e:
            raise ConfigError(str(e)) from None
        arr.name = name
        arr.speed_limit_min, arr.speed_limit_max = rec.speed_limit_min, rec.speed_limit_max
        arr.stripe_cache_size = rec.stripe_cache_size
        self.arrays[name] = arr
        return arr

    def reconcile(self) -> None:
        """Assemble every recorded array (daemon start); stop arrays whose record is gone."""
        recs = self._records()
        for name in recs:
            if name not in self.arrays:
                try:
                    self.array(name)
                except ConfigError as e:
                    log.error("raid %s: not started: %s", name, e)
        for name in list(self.arrays):
            if name not in recs:
                self.arrays.pop(name).close()

    def lun_device(self, name: str, limit: int = 0) -> ArrayLun:
        """A BlockDevice for a LUN backed by array ``name`` (OSError if it cannot run),
        exporting at most ``limit`` bytes when given."""
        try:
            return ArrayLun(self.array(name), limit)
        except ConfigError as e:
            raise OSError(5, str(e)) from None

    def stop_all(self) -> None:
        for arr in self.arrays.values():
            arr.close()
        self.arrays.clear()

    # ------------------------------------------------------------ verbs
    def create(self, name: str, level: int, members: list[str], chunk: str | int | None = None,
               layout: str | None = None, spares: int = 0, size: str | int | None = None,
               bitmap: bool | None = None, bitmap_chunk: str | int | None = None,
               journal: str | None = None) -> dict[str, Any]:
        name = normalize_name(name, "raid name")
        if name in self._records():
            raise ConfigError(f"raid array {name!r} already exists")
        members = _abs(members)
        nbytes = parse_size(size) if size is not None else None
        if nbytes is None:
            missing = [p for p in members if not exists(p)]
            if missing:
                raise ConfigError(f"{', '.join(missing)} does not exist; give --size to "
                                  "create sparse member files")
        used = {p for r in self._records().values() for p in r.members}
        clash = [p for p in members if p in used]
        if clash:
            raise ConfigError(f"{', '.join(clash)} already belongs to another array")
        chunk_bytes = parse_size(chunk) if chunk is not None else DEFAULT_CHUNK
        try:
            jmode: bool | str | None = False if journal == "off" else journal
            arr = create(name, members, int(level), chunk=chunk_bytes, layout=layout,
                         spares=int(spares), size=nbytes, start_worker=self.start_workers,
                         bitmap=bitmap, journal=jmode,
                         bitmap_chunk=parse_size(bitmap_chunk) if bitmap_chunk else None)
        except (RaidError, OSError) as e:
            raise ConfigError(str(e)) from None
        self.arrays[name] = arr
        self._save(arr)
        return arr.status()

    def assemble(self, name: str, members: list[str] | None = None, force: bool = False
                 ) -> dict[str, Any]:
        """Start a recorded array, or import one from ``members`` by their superblocks."""
        if name in self.arrays:
            raise ConfigError(f"raid array {name!r} is already running")
        rec = self._records().get(name)
        if members:
            try:
                arr = assemble(_abs(members), force=force, start_worker=self.start_workers)
            except RaidError as e:
                raise ConfigError(str(e)) from None
            arr.name = name
            self.arrays[name] = arr
            if rec is not None:
                rec.force = force
            self._save(arr, rec)
            return arr.status()
        if rec is None:
            raise ConfigError(f"raid array {name!r} is not recorded; give its members")
        if force and not rec.force:
            rec.force = True
            with self.store.write() as txn:
                txn.put(rec)
        return self.array(name).status()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        names = [name] if name else sorted(self._records())
        out = []
        for n in names:
            try:
                out.append(self.array(n).status())
            except ConfigError as e:
                out.append({"name": n, "state": f"not running: {e}", "members": []})
        return out

    def _act(self, name: str, fn: Callable[[RaidArray], Any]) -> dict[str, Any]:
        arr = self.array(name)
        try:
            fn(arr)
        except RaidError as e:
            raise ConfigError(str(e)) from None
        self._save(arr, self._record(name))
        return arr.status()

    def fail(self, name: str, member: str) -> dict[str, Any]:
        return self._act(name, lambda a: a.fail(normalize(member)))

    def remove(self, name: str, member: str) -> dict[str, Any]:
        path = normalize(member)
        arr = self.array(name)
        if all(m.path != path for m in arr.members) and path in self._record(name).members:
            # Failed before the last assembly: only the record still names it.
            self._save(arr, self._record(name))
            return arr.status()
        return self._act(name, lambda a: a.remove(path))

    def add(self, name: str, member: str, size: str | int | None = None) -> dict[str, Any]:
        path = normalize(member)
        nbytes = parse_size(size) if size is not None else None

        def do(a: RaidArray) -> None:
            if nbytes is None and not exists(path):
                raise RaidError(f"{path} does not exist; give --size to create it")
            dev = open_member(path, create_size=nbytes)
            try:
                a.add(dev, path)
            except BaseException:
                dev.close()
                raise
        return self._act(name, do)

    def replace(self, name: str, member: str, new: str, size: str | int | None = None
                ) -> dict[str, Any]:
        """Hot-replace ``member`` by ``new`` (md's want_replacement; see RaidArray.replace)."""
        path = normalize(member)
        new_path = normalize(new)
        nbytes = parse_size(size) if size is not None else None

        def do(a: RaidArray) -> None:
            if nbytes is None and not exists(new_path):
                raise RaidError(f"{new_path} does not exist; give --size to create it")
            dev = open_member(new_path, create_size=nbytes)
            try:
                a.replace(path, dev, new_path)
            except BaseException:
                if all(m.dev is not dev for m in a.members):
                    dev.close()
                raise
        return self._act(name, do)

    def check(self, name: str, repair: bool = False) -> dict[str, Any]:
        return self._act(name, lambda a: a.start_sync("repair" if repair else "check"))

    def speed(self, name: str, minimum: int | None = None, maximum: int | None = None
              ) -> dict[str, Any]:
        def do(a: RaidArray) -> None:
            if minimum is not None:
                a.speed_limit_min = int(minimum)
            if maximum is not None:
                a.speed_limit_max = int(maximum)
        return self._act(name, do)

    def cache(self, name: str, size: int | None = None) -> dict[str, Any]:
        """Set the stripe cache size of a RAID-4/5/6 array (md's stripe_cache_size)."""
        def do(a: RaidArray) -> None:
            if size is None:
                return
            if a.geo.level not in (4, 5, 6):
                raise RaidError(f"raid{a.geo.level} has no stripe cache (raid4/5/6 only)")
            try:
                a.stripe_cache_size = int(size)
            except ValueError as e:
                raise RaidError(str(e)) from None
        return self._act(name, do)

    def stop(self, name: str) -> dict[str, Any]:
        self._record(name)
        with self.store.read() as txn:
            users = [b.name for b in txn.list(Backstore) if b.kind == "raid" and b.path == name]
        if users:
            raise ConfigError(f"raid array {name!r} backs backstore {users[0]!r}; "
                              "delete that first")
        arr = self.arrays.pop(name, None)
        if arr is not None:
            arr.close()
        return {"stopped": name}

    def delete(self, name: str) -> dict[str, Any]:
        """Stop the array and forget its record (member superblocks stay)."""
        self.stop(name)
        with self.store.write() as txn:
            txn.delete(RaidVolume, name)
        return {"deleted": name}

    def wait(self, name: str, timeout: float = 0.0) -> dict[str, Any]:
        """Wait up to ``timeout`` seconds for background work; return the status."""
        arr = self.array(name)
        if timeout > 0:
            arr.wait_idle(timeout)
        return arr.status()

    # ------------------------------------------------------------ control socket
    VERBS: ClassVar[tuple[str, ...]] = ("create", "assemble", "status", "fail", "remove",
                                        "add", "replace", "check", "speed", "cache", "stop",
                                        "delete", "wait")

    def call(self, verb: str, args: dict[str, Any]) -> Any:
        if verb not in self.VERBS:
            raise ConfigError(f"unknown raid operation {verb!r}")
        try:
            return getattr(self, verb)(**args)
        except TypeError as e:
            raise ConfigError(f"raid {verb}: {e}") from None

    def control_ops(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """``raid_<verb>`` operations for the daemon's control socket."""
        return {f"raid_{v}": (lambda args, v=v: self.call(v, args)) for v in self.VERBS}


@_op()
def raid_backstore_create(txn: Txn, name: str, array: str, block_size: int = 512,
                          wce: bool = True, size: str | int | None = None) -> dict[str, Any]:
    """Register a backstore (kind ``raid``) that exports RAID array ``array`` as a LUN.

    ``size`` caps the exported capacity (arrays are sized in whole chunks, so
    a LUN of an exact size is a prefix of a slightly larger array).
    """
    name = normalize_name(name, "backstore name")
    if txn.get(Backstore, name) is not None:
        raise ConfigError(f"backstore {name!r} already exists")
    rec = txn.get(RaidVolume, array)
    if rec is None:
        raise ConfigError(f"raid array {array!r} does not exist")
    for other in txn.list(Backstore):
        if other.kind == "raid" and other.path == array:
            raise ConfigError(f"raid array {array!r} already backs backstore {other.name!r}")
    limit = parse_size(size) if size not in (None, 0) else 0
    size = rec.size - rec.size % block_size
    if limit:
        if limit > size:
            raise ConfigError(f"raid array {array!r} holds {size} bytes, less than {limit}")
        size = limit - limit % block_size
    record = Backstore(name=name, kind="raid", path=array, size=size, block_size=block_size,
                       wce=wce)
    record.validate()
    txn.put(record)
    return {**record.to_dict(), "size_text": format_size(size)}
