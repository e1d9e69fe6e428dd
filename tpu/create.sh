#!/usr/bin/env bash
# Creates a TPU VM slice now, or queues a request for one (--queued).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: tpu/create.sh [--dry-run] --tpu=NAME --zone=ZONE --type=ACCELERATOR
                     [--version=RUNTIME] [--project=P] [--queued] [--spot]

  --tpu      name of the slice (the queued resource gets the same name)
  --type     accelerator type, e.g. v5litepod-8, v5p-16, v6e-8, v4-8
  --version  TPU software version; default by generation:
             v5litepod-* -> v2-alpha-tpuv5-lite, v5p-* -> v2-alpha-tpuv5,
             v6e-* -> v2-alpha-tpuv6e, v4-* -> tpu-ubuntu2204-base
  --project  Google Cloud project (default: gcloud config's)
  --queued   create a queued resource, which waits for capacity, instead of
             failing when there is none now
  --spot     spot capacity: cheaper, can be preempted at any time
  --dry-run  print the gcloud command instead of running it
USAGE
}

NAME="" ZONE="" TYPE="" VERSION="" QUEUED=0 SPOT=0
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --tpu=*) NAME=$(value_of "$arg") ;;
    --zone=*) ZONE=$(value_of "$arg") ;;
    --type=*) TYPE=$(value_of "$arg") ;;
    --version=*) VERSION=$(value_of "$arg") ;;
    --project=*) PROJECT=$(value_of "$arg") ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done
require "$NAME" tpu
require "$ZONE" zone
require "$TYPE" type
if [[ -z $VERSION ]]; then
  case $TYPE in
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v2-*|v3-*|v4-*) VERSION=tpu-ubuntu2204-base ;;
    *) die "no default --version for --type=$TYPE; give one" ;;
  esac
fi
location_flags
SPOT_FLAG=()
if [[ $SPOT == 1 ]]; then
  SPOT_FLAG=(--spot)
fi
if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOCATION[@]}" \
    --accelerator-type="$TYPE" --runtime-version="$VERSION" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"}
else
  run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
    --accelerator-type="$TYPE" --version="$VERSION" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"}
fi
