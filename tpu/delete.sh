#!/usr/bin/env bash
# Deletes a TPU VM slice, or its queued resource (--queued), without asking.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: tpu/delete.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P] [--queued]

  --queued   the slice was made with create.sh --queued: delete the queued
             resource and the TPU VM it holds
  --dry-run  print the gcloud command instead of running it
USAGE
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
    *) die "unknown argument: $arg (see --help)" ;;
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
