#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for rdmapool: system packages, a virtualenv with
# the Python dependencies, and the native extension built in place. Safe to run again.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
venv="${RDMAPOOL_VENV:-$here/.venv}"
stamp_dir="$venv/.stamps"

apt_pkgs=(etcd-server etcd-client python3-pyverbs rdma-core ibverbs-providers libibverbs1 \
          libnl-3-200 libnl-route-3-200 qemu-system-x86 qemu-utils debootstrap iproute2 nftables \
          build-essential python3-dev cpio zstd)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts etcd as a service; rdmapool starts its own etcd processes.
  (systemctl stop etcd 2>/dev/null || service etcd stop 2>/dev/null || pkill -x etcd) >/dev/null 2>&1 || true
fi

py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
mkdir -p "$stamp_dir"

# Expose Debian's pyverbs package (only it) to the venv.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -d /usr/lib/python3/dist-packages/pyverbs ] && [ ! -e "$site/pyverbs" ]; then
  ln -s /usr/lib/python3/dist-packages/pyverbs "$site/pyverbs"
fi

req_hash="$(sha256sum requirements*.txt pyproject.toml setup.py 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -f "$stamp_dir/deps-$req_hash" ]; then
  echo "[setup] installing Python dependencies"
  # pip's config here lists local indexes that may be absent; their warnings are noise.
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/pip" install -q -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/python" -c "import msgpack, xxhash, torch, pytest" || { echo "[setup] dependency install failed" >&2; exit 1; }
  rm -f "$stamp_dir"/deps-*
  touch "$stamp_dir/deps-$req_hash"
fi

# Build the native extension in place and install the package (editable) for the console script.
"$venv/bin/pip" install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v -e "^WARNING: Location" -e "BuildBackendWarning" -e "^ " -e "^$" || true
"$venv/bin/python" setup.py -q build_ext --inplace >/dev/null 2>&1 || "$venv/bin/python" setup.py build_ext --inplace
echo "[setup] ready: $venv"
