"""`storaged ls` shows NFS exports and the listener; `storaged nfs status` offline."""

from __future__ import annotations

import json

from tests.support import storaged


def test_ls_shows_nfs_exports(tmp_path) -> None:
    d = str(tmp_path / "state")
    data = tmp_path / "data"
    data.mkdir()
    storaged("nfs", "export", "add", "/pub", str(data), "--ro", "--client", "10.1.0.0/16",
             directory=d)
    storaged("nfs", "listen", "127.0.0.1:12049", "--grace", "30", directory=d)
    out = storaged("ls", directory=d).stdout
    assert "nfs exports (1): listen=127.0.0.1:12049 portmap=auto grace=30s" in out
    assert f"/pub -> {data}  10.1.0.0/16  (ro,root_squash" in out
    desc = json.loads(storaged("ls", "--json", directory=d).stdout)
    assert [e["path"] for e in desc["nfs"]["exports"]] == ["/pub"]
    assert "handle_key" not in desc["nfs"]["exports"][0]
    st = json.loads(storaged("nfs", "status", "--json", directory=d).stdout)
    assert st["nlm"] == {"nsm_state": 0, "in_grace": False, "monitored": []}


def test_export_attr_timeout_option(tmp_path) -> None:
    """--attr-timeout is stored with the export, shown in its options, and bounded."""
    from storaged.nas.exports import Export

    d = str(tmp_path / "state")
    data = tmp_path / "data"
    data.mkdir()
    storaged("nfs", "export", "add", "/pub", str(data), directory=d)
    assert "attr_timeout=1)" in storaged("ls", directory=d).stdout
    storaged("nfs", "export", "add", "/pub", str(data), "--attr-timeout", "2.5", directory=d)
    desc = json.loads(storaged("ls", "--json", directory=d).stdout)
    assert desc["nfs"]["exports"][0]["attr_timeout"] == 2.5
    assert "attr_timeout=2.5" in desc["nfs"]["exports"][0]["options"]
    bad = storaged("nfs", "export", "add", "/pub", str(data), "--attr-timeout", "-1",
                   directory=d, check=False)
    assert bad.returncode != 0
    assert Export(path="/x", directory="/x", attr_timeout=0).problems() == []
    assert Export(path="/x", directory="/x", attr_timeout=7200).problems() != []
    assert Export(path="/x", directory="/x", attr_timeout="1").problems() != []
