"""Persistent state in one place: an LMDB store of typed, validated records.

See ``storaged.state.store`` for the on-disk layout, ``records`` for the
record types and ``config`` for config files (the backup itself is
``storaged.control.backup``).
"""

from storaged.state.alua import AluaGroup
from storaged.state.config import load_config_file, write_json_atomic
from storaged.state.errors import StateError, ValidationError
from storaged.state.params import ISCSI_PARAMS, ParamSpec, effective_param, normalize_param
from storaged.state.pr import PrRecord, PrRegistration, StatePrStore
from storaged.state.records import (
    MAX_LUN,
    Acl,
    Backstore,
    Chap,
    Record,
    Settings,
    Target,
    effective_chap,
    initiator_allowed,
)
from storaged.state.store import SCHEMA_VERSION, Store, Txn
from storaged.state.validate import normalize_iscsi_name, normalize_portal, split_portal

__all__ = [
    "ISCSI_PARAMS", "MAX_LUN", "SCHEMA_VERSION", "Acl", "AluaGroup", "Backstore", "Chap",
    "ParamSpec", "PrRecord", "PrRegistration", "Record", "Settings", "StatePrStore",
    "StateError", "Store", "Target", "Txn", "ValidationError", "effective_chap",
    "effective_param", "initiator_allowed", "load_config_file", "normalize_iscsi_name",
    "normalize_param", "normalize_portal", "split_portal", "write_json_atomic",
]
