# shellcheck shell=sh
# Sourced by zk.sh and host.sh: install the project on a VM (DCDT_INSTALL=1). One copy, so the
# store VM and the host VMs cannot drift apart in how they get the project.
# usage: dcdt_install DEBIAN_PACKAGE...   (the role's packages; python3-venv is added)
# env:   DCDT_VENV   the virtualenv (default /opt/dcdeploy, where vagrant/build-box.sh puts it)
#        DCDT_WHEELS a directory of wheels to install from instead of an index
#        DCDT_SRC    the project source (default /vagrant)
# sets:  py, the venv's python
dcdt_install() {
    export DEBIAN_FRONTEND=noninteractive
    venv=${DCDT_VENV:-/opt/dcdeploy}
    src=${DCDT_SRC:-/vagrant}
    # a box with the packages already in it (vagrant/build-box.sh) needs no network here
    if ! dpkg -s python3-venv "$@" >/dev/null 2>&1; then
        apt-get update -q
        apt-get install -y -q python3-venv "$@"
    fi
    if [ -f "$venv/box-dependencies.txt" ]; then
        # the box carries the venv with the dependencies, setuptools and wheel: only the
        # project is built and installed (dependencies the box lacks come from the wheels, so
        # a box older than setup.cfg still gets them)
        "$venv/bin/pip" install -q --no-index --no-build-isolation \
            ${DCDT_WHEELS:+--find-links "$DCDT_WHEELS"} "$src"
    else
        python3 -m venv "$venv"
        if [ -n "${DCDT_WHEELS:-}" ]; then  # the dependencies as wheels, no index
            "$venv/bin/pip" install -q --no-index --find-links "$DCDT_WHEELS" "$src"
        else
            "$venv/bin/pip" install -q "$src"
        fi
    fi
    # shellcheck disable=SC2034  # py is the caller's: the python it runs provision with
    py=$venv/bin/python
}
