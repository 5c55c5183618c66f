"""vagrant/Vagrantfile is valid for Debian's vagrant (with the vagrant-libvirt plugin, which
makes a provider usable without a hypervisor), and it provisions with scripts/setup.sh."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.support import require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAGRANT_DIR = os.path.join(ROOT, "vagrant")


def _validate(tmp_path, **env: str) -> subprocess.CompletedProcess:
    vagrant = require_tool("vagrant", "vagrant")
    return subprocess.run([vagrant, "validate"], cwd=VAGRANT_DIR, capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, VAGRANT_DOTFILE_PATH=str(tmp_path / ".vagrant"),
                                   VAGRANT_CHECKPOINT_DISABLE="1", **env))


@pytest.mark.peer
def test_vagrant_validate(tmp_path):
    for clients in ("3", "2"):
        r = _validate(tmp_path, STORAGED_LAB_CLIENTS=clients)
        assert r.returncode == 0 and "validated successfully" in r.stdout, (
            f"vagrant validate failed (Debian packages vagrant and vagrant-libvirt; "
            f"scripts/setup.sh installs both):\n{r.stdout}\n{r.stderr}")


@pytest.mark.peer
def test_vagrant_validate_catches_a_broken_file(tmp_path):
    # The check can fail: a provisioner pointing at a missing script is refused.
    require_tool("vagrant", "vagrant")
    broken = tmp_path / "v"
    broken.mkdir()
    text = open(os.path.join(VAGRANT_DIR, "Vagrantfile")).read()
    (broken / "Vagrantfile").write_text(text)  # provision.sh is not beside it
    r = subprocess.run(["vagrant", "validate"], cwd=broken, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1",
                                             VAGRANT_DOTFILE_PATH=str(tmp_path / ".vg")))
    assert r.returncode != 0 and "provision.sh" in (r.stdout + r.stderr)


def test_vms_provision_with_the_project_setup_script():
    text = open(os.path.join(VAGRANT_DIR, "Vagrantfile")).read()
    setups = re.findall(r'inline: "cd /storaged && \./scripts/setup\.sh"', text)
    assert len(setups) == 2  # storage and client VMs: the one install path
    prov = open(os.path.join(VAGRANT_DIR, "provision.sh")).read()
    assert not re.search(r"^\s*(apt-get|apt|pip|pip3)\s+install", prov, re.M)
    setup = open(os.path.join(ROOT, "scripts", "setup.sh")).read()
    for pkg in ("vagrant", "vagrant-libvirt", "open-iscsi", "multipath-tools"):
        assert re.search(rf"\b{pkg}\b", setup), pkg
