#!/usr/bin/env bash
# Streams the log of worker 0 (the process that writes jaxft's logs and metrics).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  echo "usage: tpu/logs.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P]"
}

NAME="" ZONE=""
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --tpu=*) NAME=$(value_of "$arg") ;;
    --zone=*) ZONE=$(value_of "$arg") ;;
    --project=*) PROJECT=$(value_of "$arg") ;;
    *) die "unknown argument: $arg" ;;
  esac
done
require "$NAME" tpu
require "$ZONE" zone
location_flags
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=0 \
  --command="tail -n +1 -F ~/jaxft.log"
