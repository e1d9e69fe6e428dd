#!/usr/bin/env bash
# Installs jaxft, and JAX for TPU, in ~/jaxft/.venv on every worker of a slice.
# Safe to run again: it updates the checkout and the packages.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

# Where workers clone jaxft from unless --repo or --src says otherwise: set it
# to your fork, or export JAXFT_REPO.
DEFAULT_REPO=${JAXFT_REPO:-https://github.com/YOUR_ORG/jaxft.git}
# The TPU software images ship Python 3.10; jax, flax and orbax need 3.11 or
# newer, so the venv gets a Python that uv (installed if missing) provides.
DEFAULT_PYTHON=3.12

usage() {
  cat <<USAGE
usage: tpu/setup.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P]
                    [--repo=GIT_URL | --src=LOCAL_CHECKOUT] [--python=$DEFAULT_PYTHON]

  --repo     git URL each worker clones into ~/jaxft, or pulls if it is there
             (default: \$JAXFT_REPO, else $DEFAULT_REPO)
  --src      pack this local checkout (without .git, .venv, runs/, build/,
             caches) and unpack it into ~/jaxft on every worker instead
  --python   Python version of the workers' venv (default $DEFAULT_PYTHON)
  --dry-run  print the commands instead of running them
USAGE
}

NAME="" ZONE="" REPO="" SRC="" PYTHON=$DEFAULT_PYTHON
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --tpu=*) NAME=$(value_of "$arg") ;;
    --zone=*) ZONE=$(value_of "$arg") ;;
    --project=*) PROJECT=$(value_of "$arg") ;;
    --repo=*) REPO=$(value_of "$arg") ;;
    --src=*) SRC=$(value_of "$arg") ;;
    --python=*) PYTHON=$(value_of "$arg") ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done
require "$NAME" tpu
require "$ZONE" zone
[[ -z $REPO || -z $SRC ]] || die "give --repo or --src, not both"
if [[ -z $SRC ]]; then
  REPO=${REPO:-$DEFAULT_REPO}
  [[ $REPO != *YOUR_ORG* ]] ||
    die "no repository to clone: pass --repo=GIT_URL (or export JAXFT_REPO), or --src=. to copy this checkout"
else
  [[ -f $SRC/pyproject.toml ]] || die "--src=$SRC is not a jaxft checkout (no pyproject.toml)"
fi
location_flags

if [[ -n $SRC ]]; then
  PACK=${TMPDIR:-/tmp}/jaxft-src-$$.tgz
  if [[ $DRY_RUN == 0 ]]; then
    trap 'rm -f "$PACK"' EXIT
  fi
  run tar -czf "$PACK" -C "$SRC" --exclude=.git --exclude=.venv --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache \
    --exclude=.mypy_cache --exclude=./.cache --exclude=./runs \
    --exclude=./build .
  run gcloud compute tpus tpu-vm scp "$PACK" "$NAME:jaxft-src.tgz" "${LOCATION[@]}" --worker=all
  FETCH="mkdir -p ~/jaxft && tar -xzf ~/jaxft-src.tgz -C ~/jaxft && rm ~/jaxft-src.tgz"
else
  quote "$REPO"
  FETCH="if [ -d ~/jaxft/.git ]; then git -C ~/jaxft pull --ff-only; else git clone $REPO ~/jaxft; fi"
fi
quote "$PYTHON"
INSTALL="set -e; $FETCH; cd ~/jaxft"
INSTALL+="; export PATH=\"\$HOME/.local/bin:\$PATH\""
INSTALL+="; command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh"
INSTALL+="; [ -d .venv ] || uv venv --seed --python $REPLY .venv"
INSTALL+="; . .venv/bin/activate && pip install -U pip && pip install -U \"jax[tpu]\" && pip install -e ."
INSTALL+=" && python -c \"import jax, jaxft\" && echo \"jaxft installed on \$(hostname)\""
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$INSTALL"
