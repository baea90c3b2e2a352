#!/usr/bin/env bash
# Install the real peer MTAs that tests/test_peers.py starts: Postfix from Debian (apt-get), aiosmtpd from PyPI.
#
#   scripts/install-peers.sh [PYTHON]
#
# PYTHON is the interpreter that gets aiosmtpd (default: python3; pass a venv's python on Debian 12, whose system
# python refuses pip installs). tox installs aiosmtpd itself through the "test" extra, so CI may skip that half.
# Safe to run twice. Postfix is installed with debconf "No configuration": the package then neither configures
# nor starts the system's own instance; the tests run their own instances from temporary config directories.
set -euo pipefail
PYTHON=${1:-python3}
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" = 0 ]; then
  if dpkg-query -W -f='${Status}' postfix 2>/dev/null | grep -q 'install ok installed'; then
    echo "install-peers: postfix already installed: $(postconf -d -h mail_version 2>/dev/null || echo '?')"
  else
    if command -v debconf-set-selections >/dev/null; then
      echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    fi
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends postfix >/dev/null
    echo "install-peers: installed postfix $(postconf -d -h mail_version)"
  fi
else
  echo "install-peers: not root, skipping apt-get install postfix (Postfix peers must run as root anyway)" >&2
fi

if "$PYTHON" -c 'import aiosmtpd' 2>/dev/null; then
  echo "install-peers: aiosmtpd already importable by $PYTHON"
elif ! "$PYTHON" -m pip install -q 'aiosmtpd>=1.4.4'; then
  echo "install-peers: pip could not install aiosmtpd for $PYTHON; pass a virtualenv's python as argument" >&2
  exit 1
fi
