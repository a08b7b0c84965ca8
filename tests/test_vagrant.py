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
import sys
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


def _stubs(tmp_path: Path, have_packages: bool) -> tuple[Path, Path]:
    """A PATH directory whose dpkg, apt-get, systemctl and python3 only log their arguments
    (python3 -m venv DIR also makes DIR/bin/pip, which logs too), and the log."""
    bin_, log = tmp_path / "stubs", tmp_path / "calls.log"
    bin_.mkdir()
    logline = f'echo "$(basename "$0") $*" >> {log}\n'
    for name, body in {"dpkg": logline + ("exit 0" if have_packages else "exit 1"),
                       "apt-get": logline, "systemctl": logline,
                       "python3": logline + '[ "$1 $2" = "-m venv" ] || exit 3\n'
                                            'mkdir -p "$3/bin"\n'
                                            f'printf \'#!/bin/sh\\n{logline}\' > "$3/bin/pip"\n'
                                            'chmod +x "$3/bin/pip"'}.items():
        (bin_ / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_ / name).chmod(0o755)
    return bin_, log


@pytest.mark.parametrize("box", [True, False], ids=["box", "bare-vm"])
@pytest.mark.parametrize("wheels", [True, False], ids=["wheels", "index"])
def test_install_sh_installs_the_project_on_a_box_or_a_bare_vm(tmp_path, box, wheels):
    """provision/install.sh, the one install step zk.sh and host.sh share, with stubs for the
    system tools: a box (vagrant/build-box.sh: packages in, venv with the dependencies) only
    builds the project into its venv, offline; a bare VM gets the packages, a venv and the
    project, from the wheels when there are some and from the index otherwise."""
    bin_, log = _stubs(tmp_path, have_packages=box)
    venv, src, whl = tmp_path / "venv", tmp_path / "src", tmp_path / "wheels"
    if box:
        (venv / "bin").mkdir(parents=True)
        (venv / "box-dependencies.txt").write_text("kazoo==2.9.0\n")
        shutil.copy(bin_ / "apt-get", venv / "bin" / "pip")  # logs as "pip"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "DCDT_VENV": str(venv),
           "DCDT_SRC": str(src)}
    env.pop("DCDT_WHEELS", None)
    if wheels:
        env["DCDT_WHEELS"] = str(whl)
    out = subprocess.run(["sh", "-c", f'. {tb.SCRIPTS / "install.sh"}; '
                          'dcdt_install zookeeper; echo "py=$py"'],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == f"py={venv}/bin/python"
    calls = log.read_text().splitlines()
    assert calls[0] == "dpkg -s python3-venv zookeeper"
    pip = [c for c in calls if c.startswith("pip ")]
    find = f"--find-links {whl} " if wheels else ""
    if box:
        assert not any(c.startswith(("apt-get", "python3")) for c in calls), calls
        assert pip == [f"pip install -q --no-index --no-build-isolation {find}{src}"]
    else:
        assert "apt-get install -y -q python3-venv zookeeper" in calls
        assert f"python3 -m venv {venv}" in calls
        assert pip == ([f"pip install -q --no-index {find}{src}"] if wheels
                       else [f"pip install -q {src}"])


@pytest.mark.parametrize("script", ["zk.sh", "host.sh"])
def test_both_provision_scripts_install_through_install_sh(tmp_path, script):
    """zk.sh and host.sh with DCDT_INSTALL=1, as on a VM built from the box, find install.sh
    beside themselves, install their role's packages and then provision with the venv's
    python (here a wrapper around this one)."""
    bin_, log = _stubs(tmp_path, have_packages=True)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "box-dependencies.txt").write_text("")
    shutil.copy(bin_ / "apt-get", venv / "bin" / "pip")
    (venv / "bin" / "python").write_text(f'#!/bin/sh\necho "venv-python" >> {log}\n'
                                          f'exec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "DCDT_VENV": str(venv),
           "DCDT_SRC": str(tmp_path / "src"), "DCDT_INSTALL": "1", "DCDT_START": "0",
           "PYTHONPATH": str(REPO)}
    args = (["1", "10.9.0.2", str(tmp_path / "zk")] if script == "zk.sh" else
            ["web-1", "r1", "10.9.0.5", str(tmp_path / "host"), "zk://10.9.0.2:2181/dc",
             "api=8080"])
    out = subprocess.run(["sh", str(tb.SCRIPTS / script), *args], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    packages = "zookeeper" if script == "zk.sh" else "transmission-daemon iproute2"
    assert calls[0] == f"dpkg -s python3-venv {packages}"
    assert f"pip install -q --no-index --no-build-isolation {tmp_path / 'src'}" in calls
    assert "venv-python" in calls  # provisioned by the venv's python, not the system's
    made = tmp_path / ("zk" if script == "zk.sh" else "host/agent.conf")
    assert made.exists()
