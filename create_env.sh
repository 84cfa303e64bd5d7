#!/usr/bin/env bash
# Set up blip_repro and (optionally) run a command inside the environment.
#
#   bash create_env.sh                     # conda/mamba env "blip-repro" if conda exists, else ./.venv
#   bash create_env.sh --dev               # ... plus the test dependencies
#   bash create_env.sh -- blip-repro reproduce --suite shapes     # set up, then run a command in the env
#   bash create_env.sh --venv              # force ./.venv even when conda exists
#
# Idempotent: a second run only checks (the install is skipped while pyproject.toml is unchanged).
# Installs the package editable, registers the Jupyter kernel "blip-repro", and checks for java (needed by the
# caption metrics' PTBTokenizer and METEOR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
DEV=0; FORCE_VENV=0; CMD=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) DEV=1 ;;
    --venv) FORCE_VENV=1 ;;
    --) shift; CMD=("$@"); break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "create_env.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
EXTRAS=""; [ "$DEV" = 1 ] && EXTRAS="[dev]"
say() { echo "[create_env] $*" >&2; }

CONDA=""
if [ "$FORCE_VENV" = 0 ]; then
  for c in mamba conda; do command -v "$c" >/dev/null 2>&1 && { CONDA=$c; break; }; done
fi
if [ -n "$CONDA" ]; then
  if ! "$CONDA" env list | awk '{print $1}' | grep -qx blip-repro; then
    say "creating $CONDA env blip-repro from environment.yml"
    "$CONDA" env create -q -f environment.yml
  fi
  PREFIX=$("$CONDA" run -n blip-repro python -c 'import sys; print(sys.prefix)')
else
  if [ ! -x .venv/bin/python ]; then
    PY=$(command -v python3.11 || command -v python3)
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
      || { say "Python 3.11 is required (found $("$PY" --version 2>&1)); install it or use conda"; exit 1; }
    say "creating .venv with $PY"
    "$PY" -m venv .venv
  fi
  PREFIX=$(pwd)/.venv
fi
PYTHON="$PREFIX/bin/python"

STAMP="$PREFIX/.blip-repro-install"
WANT="$(sha256sum pyproject.toml | cut -c1-16)$EXTRAS"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  say "installing blip_repro$EXTRAS (pinned dependencies; about 2 minutes the first time)"
  "$PYTHON" -m pip install -q --disable-pip-version-check -e ".$EXTRAS" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$PYTHON" -c "import blip_repro, transformers, papermill" || { say "install failed"; exit 1; }
  echo "$WANT" > "$STAMP"
fi
if [ ! -f "$PREFIX/share/jupyter/kernels/blip-repro/kernel.json" ]; then
  "$PYTHON" -m ipykernel install --sys-prefix --name blip-repro --display-name "BLIP repro" >/dev/null
  say "registered Jupyter kernel blip-repro"
fi
if ! command -v java >/dev/null 2>&1; then
  say "WARNING: java not found; the caption metrics (PTBTokenizer, METEOR) need it:"
  say "  Debian/Ubuntu: sudo apt-get install -y default-jre-headless   conda: conda install -c conda-forge openjdk=17"
fi
say "ready: $PREFIX (activate with: source $PREFIX/bin/activate)"

if [ ${#CMD[@]} -gt 0 ]; then
  export PATH="$PREFIX/bin:$PATH"
  exec "${CMD[@]}"
fi
