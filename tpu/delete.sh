#!/usr/bin/env bash
# Deletes a TPU VM slice (or its queued resource, with --queued).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  echo "usage: tpu/delete.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P] [--queued]"
}

NAME="" ZONE="" QUEUED=0
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --tpu=*) NAME=$(value_of "$arg") ;;
    --zone=*) ZONE=$(value_of "$arg") ;;
    --project=*) PROJECT=$(value_of "$arg") ;;
    --queued) QUEUED=1 ;;
    *) die "unknown argument: $arg" ;;
  esac
done
require "$NAME" tpu
require "$ZONE" zone
location_flags
if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
fi
