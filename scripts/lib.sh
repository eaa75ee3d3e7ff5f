# Sourced by scripts/serve and scripts/test (from the checkout's root): Debian packages, and
# a Python that pip may install into.

# apt_install PACKAGE...: install what is missing, without starting any service it ships
# (dockerd, containerd, nginx): the tests start their own instances on loopback ports.
apt_install() {
  [ $# -gt 0 ] || return 0
  local sudo="" guard=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    guard=1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
  [ -z "$guard" ] || $sudo rm -f /usr/sbin/policy-rc.d
}

# externally_managed: true when $PYTHON refuses `pip install` (PEP 668: Debian 12's
# /usr/bin/python3 and every distribution Python since) and is not already a virtualenv.
externally_managed() {
  "$PYTHON" -c 'import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if os.path.exists(marker) and sys.prefix == sys.base_prefix else 1)'
}

# use_python [venv]: set PYTHON to an interpreter pip installs into. $PYTHON (default python3)
# itself, unless it is externally managed or "venv" is asked for: then ./.venv, made from it
# (python3-venv is installed first where Debian left it out).
use_python() {
  PYTHON=${PYTHON:-python3}
  command -v "$PYTHON" >/dev/null || apt_install python3
  if [ "${1:-}" = venv ] || externally_managed; then
    if [ ! -x .venv/bin/python ]; then
      if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        apt_install python3-venv
        "$PYTHON" -m venv .venv
      fi
    fi
    PYTHON=$PWD/.venv/bin/python
  fi
}
