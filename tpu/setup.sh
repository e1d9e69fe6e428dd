#!/usr/bin/env bash
# Installs jaxft (and JAX for TPU) on every worker of a TPU VM slice.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: tpu/setup.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P]
                    [--repo=GIT_URL | --src=LOCAL_CHECKOUT]

  --repo     git URL each worker clones into ~/jaxft (default: $DEFAULT_REPO)
  --src      copy this local checkout to ~/jaxft on every worker instead
  --dry-run  print the gcloud commands instead of running them
USAGE
}

DEFAULT_REPO="https://github.com/YOUR_ORG/jaxft.git"
NAME="" ZONE="" REPO=$DEFAULT_REPO SRC=""
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --tpu=*) NAME=$(value_of "$arg") ;;
    --zone=*) ZONE=$(value_of "$arg") ;;
    --project=*) PROJECT=$(value_of "$arg") ;;
    --repo=*) REPO=$(value_of "$arg") ;;
    --src=*) SRC=$(value_of "$arg") ;;
    *) die "unknown argument: $arg" ;;
  esac
done
require "$NAME" tpu
require "$ZONE" zone
location_flags
if [[ -n $SRC ]]; then
  run gcloud compute tpus tpu-vm scp --recurse "$SRC" "$NAME:~/jaxft" "${LOCATION[@]}" --worker=all
  FETCH="true"
else
  printf -v FETCH '[ -d ~/jaxft ] || git clone %q ~/jaxft' "$REPO"
fi
INSTALL="set -e; $FETCH; cd ~/jaxft && python3 -m venv .venv && . .venv/bin/activate"
INSTALL+=" && pip install -U pip && pip install -U 'jax[tpu]' && pip install -e ."
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$INSTALL"
