#!/usr/bin/env bash
# The project's dependencies (and its build backend) as wheels in $DCVM_CACHE/wheels, synced
# into every VM, so provisioning installs the project with `pip --no-index` and the VMs
# need no network (vagrant/Vagrantfile, DCDT_WHEELS in provision/host.sh). Runs on the host
# with the repository's .venv (scripts/setup.sh), or python3 -m pip.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=${DCVM_CACHE:-$HOME/.cache/dcdeploy}/wheels
pip=("$repo/.venv/bin/python" -m pip)
[ -x "$repo/.venv/bin/python" ] || pip=(python3 -m pip)
mkdir -p "$out"
"${pip[@]}" wheel -q -w "$out" "$repo" setuptools wheel
rm -f "$out"/supervisor_dcdeploy-*.whl  # the VMs build the project itself from /vagrant
echo "$out"
