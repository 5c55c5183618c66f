"""The LMDB-backed state store: one environment, typed records, transactions.

Layout: one LMDB environment at ``<dir>/state.lmdb`` (a directory holding
``data.mdb`` and ``lock.mdb``) with two named databases:

* ``records``: key ``<kind>/<key>`` (utf-8), value the record's JSON (utf-8).
  One database with prefixed keys (rather than one database per kind) means
  new record kinds need no schema step and DB handles never go stale.
* ``meta``: ``schema_version`` and other store-level facts.

LMDB makes this safe across processes (the CLI working offline and a daemon)
and crash-safe: a transaction either commits whole or not at all.  Opening the
same directory twice in one process shares one environment, because LMDB's
locks break if a process opens an environment twice.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import lmdb

from storaged.state.errors import StateError, ValidationError
from storaged.state.records import Record, Settings

SCHEMA_VERSION = 1
MAP_SIZE = 1 << 30
_MAX_DBS = 8

R = TypeVar("R", bound=Record)

_envs_lock = threading.Lock()
_envs: dict[str, list[Any]] = {}  # realpath -> [Environment, refcount]


def _rkey(cls: type[Record], key: str) -> bytes:
    return f"{cls.RECORD_KIND}/{key}".encode()


class Txn:
    """A read or write transaction; use via ``Store.read()`` / ``Store.write()``."""

    def __init__(self, txn: lmdb.Transaction, records: Any, write: bool) -> None:
        self._txn = txn
        self._db = records
        self.writable = write

    def _check_write(self) -> None:
        if not self.writable:
            raise StateError("cannot modify state in a read-only transaction")

    def get(self, cls: type[R], key: str) -> R | None:
        """The record of kind ``cls`` with ``key``, or None."""
        raw = self._txn.get(_rkey(cls, key), db=self._db)
        return None if raw is None else cls.from_dict(json.loads(raw))

    def put(self, record: Record) -> None:
        """Validate (normalizing in place) and store ``record``, replacing any old one."""
        try:
            record.validate()
        except ValidationError as e:
            raise e.prefixed(f"{record.RECORD_KIND} {record.key!r}") from None
        self._check_write()
        value = json.dumps(record.to_dict(), sort_keys=True, separators=(",", ":"))
        self._txn.put(_rkey(type(record), record.key), value.encode(), db=self._db)

    def delete(self, cls: type[Record], key: str) -> bool:
        """Delete a record; True if it existed."""
        self._check_write()
        return bool(self._txn.delete(_rkey(cls, key), db=self._db))

    def keys(self, cls: type[Record]) -> list[str]:
        """Keys of all records of ``cls``, sorted (bytewise, i.e. by code point)."""
        prefix = f"{cls.RECORD_KIND}/".encode()
        out: list[str] = []
        with self._txn.cursor(db=self._db) as cur:
            if cur.set_range(prefix):
                for k in cur.iternext(keys=True, values=False):
                    if not k.startswith(prefix):
                        break
                    out.append(k[len(prefix):].decode())
        return out

    def list(self, cls: type[R]) -> list[R]:
        """All records of ``cls``, sorted by key."""
        prefix = f"{cls.RECORD_KIND}/".encode()
        out: list[R] = []
        with self._txn.cursor(db=self._db) as cur:
            if cur.set_range(prefix):
                for k, v in cur.iternext():
                    if not k.startswith(prefix):
                        break
                    out.append(cls.from_dict(json.loads(v)))
        return out

    def clear(self, cls: type[Record]) -> int:
        """Delete every record of ``cls``; return how many there were."""
        keys = self.keys(cls)
        for key in keys:
            self.delete(cls, key)
        return len(keys)

    def settings(self) -> Settings:
        """The global Settings record, or the defaults if none was stored."""
        return self.get(Settings, Settings.KEY) or Settings()


class Store:
    """The state directory: ``<dir>/state.lmdb``, mode 0700 dir / 0600 files."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, "state.lmdb")
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self._real = os.path.realpath(self.path)
            self._env = self._acquire()
        except (OSError, lmdb.Error) as e:
            raise StateError(f"cannot open state directory {self.directory}: {e}") from e
        self._closed = False
        self._records = self._env.open_db(b"records")
        self._meta = self._env.open_db(b"meta")
        self._check_schema()

    def _acquire(self) -> lmdb.Environment:
        with _envs_lock:
            entry = _envs.get(self._real)
            if entry is None:
                env = lmdb.open(self.path, map_size=MAP_SIZE, subdir=True, max_dbs=_MAX_DBS,
                                mode=0o600)
                os.chmod(self.path, 0o700)
                for name in ("data.mdb", "lock.mdb"):
                    os.chmod(os.path.join(self.path, name), 0o600)
                entry = _envs[self._real] = [env, 0]
            entry[1] += 1
            return entry[0]

    def _check_schema(self) -> None:
        with self._env.begin(write=True) as txn:
            raw = txn.get(b"schema_version", db=self._meta)
            if raw is None:
                txn.put(b"schema_version", str(SCHEMA_VERSION).encode(), db=self._meta)
                return
        version = int(raw)
        if version > SCHEMA_VERSION:
            self.close()
            raise StateError(
                f"{self.path} has schema version {version}, newer than this storaged "
                f"supports ({SCHEMA_VERSION}); upgrade storaged")

    @property
    def schema_version(self) -> int:
        """The schema version recorded in the store."""
        with self._env.begin() as txn:
            return int(txn.get(b"schema_version", db=self._meta))

    def close(self) -> None:
        """Release the environment (closed when the last Store on it closes)."""
        if self._closed:
            return
        self._closed = True
        with _envs_lock:
            entry = _envs.get(self._real)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _envs[self._real]
                    entry[0].close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def read(self) -> Iterator[Txn]:
        """A consistent read-only snapshot."""
        self._check_open()
        txn = self._env.begin(write=False)
        try:
            yield Txn(txn, self._records, write=False)
        finally:
            txn.abort()

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """A write transaction: commits on normal exit, aborts if the block raises.

        Only one write transaction runs at a time (across processes too).
        """
        self._check_open()
        txn = self._env.begin(write=True)
        try:
            yield Txn(txn, self._records, write=True)
        except BaseException:
            txn.abort()
            raise
        txn.commit()

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("store is closed")
