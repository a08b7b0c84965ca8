"""The Vagrant testbed's files, checked without booting a VM (that run is too slow for CI
under software emulation: ``vagrant/run-demo.sh``, docs/testbed.md): the Vagrantfile
validates with the libvirt plugin, for every topology it offers and refuses a bad one; the
shell scripts parse and pass shellcheck; the VMs use the namespace testbed's provisioning
scripts. ``.ci/run`` installs vagrant, vagrant-libvirt and shellcheck, so under CI a
missing tool fails these tests (tests/needs.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from needs import unavailable

from supervisor_dcdeploy.lab.testbed import provision as tb

REPO = Path(__file__).resolve().parent.parent
VAGRANT = REPO / "vagrant"
SCRIPTS = sorted(VAGRANT.glob("*.sh"))
PROVISION = sorted(tb.SCRIPTS.glob("*.sh"))


def _vagrant() -> str:
    exe = shutil.which("vagrant")
    if exe is None:
        unavailable("vagrant not installed (bash vagrant/setup-host.sh install-check)")
    plugins = subprocess.run([exe, "plugin", "list"], capture_output=True, text=True,
                             timeout=120).stdout
    if "vagrant-libvirt" not in plugins:
        unavailable("the vagrant-libvirt plugin is not installed (Debian: vagrant-libvirt)")
    return exe


def _validate(exe: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "validate"], cwd=VAGRANT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VAGRANT_CWD": str(VAGRANT), **env})


@pytest.mark.parametrize("env", [{}, {"ZK_NODES": "3", "HOSTS": "4"},
                                 {"DCVM_DRIVER": "kvm", "VAGRANT_BOX": "debian/bookworm64"},
                                 {"DCVM_ENGINE": "transmission"}],
                         ids=["default", "ensemble", "kvm-cloud-box", "transmission"])
def test_vagrantfile_validates(env):
    proc = _validate(_vagrant(), **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("env", [{"DCVM_DRIVER": "xen"}, {"ZK_NODES": "2"}, {"HOSTS": "0"},
                                 {"DCVM_ENGINE": "rtorrent"}],
                         ids=["driver", "zk-nodes", "hosts", "engine"])
def test_vagrantfile_refuses_a_bad_setting_naming_it(env):
    proc = _validate(_vagrant(), **env)
    assert proc.returncode != 0
    assert next(iter(env)) in proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS + PROVISION, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    shell = "bash" if script.read_text().startswith("#!/usr/bin/env bash") else "sh"
    parsed = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    if shutil.which("shellcheck") is None:
        unavailable("shellcheck not installed (bash vagrant/setup-host.sh install-check)")
    checked = subprocess.run(["shellcheck", "-s", shell, str(script)], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stdout


def test_the_vm_scripts_are_there():
    assert {p.name for p in SCRIPTS} >= {"setup-host.sh", "build-box.sh", "driver.sh",
                                         "wheels.sh", "run-demo.sh"}


def test_vagrantfile_runs_the_testbed_provisioning_scripts():
    """The VMs are provisioned by the scripts CI runs in namespaces (not a copy of them)."""
    text = (VAGRANT / "Vagrantfile").read_text()
    prov = re.search(r'PROVISION = "/vagrant/([^"]+)"', text).group(1)
    assert (REPO / prov).resolve() == tb.SCRIPTS
    used = set(re.findall(r"#\{PROVISION\}/(\w+\.sh)", text))
    assert used == {"zk.sh", "host.sh"}
    assert all((tb.SCRIPTS / name).is_file() for name in used)
