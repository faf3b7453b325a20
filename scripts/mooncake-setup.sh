#!/usr/bin/env bash
# Installs Mooncake's Transfer Engine (CPU build) for the transport benchmark's comparison column:
# Debian's libibverbs1 / libnl (the wheel links against them even for TCP) and the PyPI wheel
# mooncake-transfer-engine-non-cuda into the project's virtualenv. Idempotent; optional (bench/transport.py
# reports null for the mooncake columns, with the reason, when it is missing).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${RDMAPOOL_VENV:-$here/.venv}"
[ -x "$venv/bin/python" ] || { echo "no virtualenv at $venv: run scripts/setup.sh first" >&2; exit 1; }
pkgs=(libibverbs1 libnl-3-200 libnl-route-3-200)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! "$venv/bin/python" -c 'import importlib.metadata as m; m.version("mooncake-transfer-engine-non-cuda")' 2>/dev/null; then
  "$venv/bin/pip" install -q mooncake-transfer-engine-non-cuda
fi
bin="$("$venv/bin/python" - <<'PY'
import importlib.metadata as m
# the real binary inside the package (bin/transfer_engine_bench is a Python wrapper around it)
for f in m.files("mooncake-transfer-engine-non-cuda") or []:
    if f.name == "transfer_engine_bench" and f.parts[0] == "mooncake":
        print(f.locate())
        break
PY
)"
if [ -z "$bin" ]; then
  echo "[mooncake] installed, but transfer_engine_bench was not found in the wheel" >&2
  exit 1
fi
chmod +x "$bin" 2>/dev/null || true
echo "[mooncake] transfer_engine_bench: $bin"
