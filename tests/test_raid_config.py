"""RAID records in the whole-config export/import, and journal/bitmap options surviving assembly."""

from __future__ import annotations

import pytest

from storaged.control.backup import export_config, import_config
from storaged.raid import RaidError, assemble, create
from storaged.raid.service import RaidService, RaidVolume
from storaged.state.store import Store


def test_config_export_import_keeps_raid_arrays(tmp_path) -> None:
    members = [str(tmp_path / f"d{i}") for i in range(3)]
    with Store(str(tmp_path / "state")) as store:
        svc = RaidService(store, start_workers=False)
        st = svc.create("vol", 5, members, chunk="64K", size="4M", journal="sync")
        assert st["journal"] == "sync" and st["bitmap"]["dirty"] == 0
        svc.stop_all()
        data = export_config(store)
        assert [a["name"] for a in data["raid_arrays"]] == ["vol"]
        assert data["raid_arrays"][0]["members"] == members
        with store.write() as txn:
            txn.delete(RaidVolume, "vol")
        assert import_config(store, data) == []
        with store.read() as txn:
            rec = txn.get(RaidVolume, "vol")
        assert rec is not None and rec.uuid == st["uuid"] and rec.level == 5
        # a config without raid_arrays leaves the records alone
        assert import_config(store, {k: v for k, v in data.items()
                                     if k != "raid_arrays"}) == []
        with store.read() as txn:
            assert txn.get(RaidVolume, "vol") is not None
        bad = dict(data, raid_arrays=[dict(data["raid_arrays"][0], level=7)])
        errors = import_config(store, bad)
        assert errors and "raid array #1" in errors[0]
        svc2 = RaidService(store, start_workers=False)
        assert svc2.status("vol")[0]["journal"] == "sync"
        svc2.stop_all()


def test_journal_and_bitmap_modes_survive_assembly(tmp_path) -> None:
    paths = [str(tmp_path / f"d{i}") for i in range(4)]
    arr = create("m", paths, 6, chunk=16 * 1024, size=2 << 20, start_worker=False)
    assert arr.status()["journal"] == "async" and arr.bitmap is not None
    arr.close()
    arr = assemble(paths, start_worker=False)
    assert arr.status()["journal"] == "async" and arr.bitmap is not None
    arr.close()
    mirror = [str(tmp_path / f"r{i}") for i in range(2)]
    with pytest.raises(RaidError, match="raid4/5/6"):
        create("r", mirror, 1, size=2 << 20, journal="sync")
    arr = create("r", mirror, 1, size=2 << 20, bitmap=False, start_worker=False)
    assert arr.status()["journal"] is None and arr.status()["bitmap"] is None
    arr.close()
    arr = assemble(mirror, start_worker=False)
    assert arr.bitmap is None and arr.journal is None
    arr.close()
    with pytest.raises(RaidError, match="raid0"):
        create("z", [str(tmp_path / f"z{i}") for i in range(2)], 0, size=2 << 20, bitmap=True)
