#!/usr/bin/env bash
# Idempotent set-up: system packages, then .venv with torch (CPU, pinned) first,
# then semedge and its extras through constraints.txt (known-good versions).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(espeak-ng wordnet-base fortunes-min codec2 sox flite)
# Only for `make test-slow` (SEMEDGE_SLOW=1): headless check of the build report.
[ "${SEMEDGE_SLOW:-0}" = 1 ] && APT_PKGS+=(chromium)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing system packages: ${missing[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing system packages: ${missing[*]}" >&2
    echo "bootstrap: fix: run 'sudo apt-get install ${missing[*]}' and retry" >&2
    exit 2
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.semedge-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and pinned: any other spec pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -c constraints.txt -e ".[full,test,scale,federated]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import semedge, torch, onnxruntime, transformers, ray, flwr" \
  || { echo "bootstrap: the install failed; see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
