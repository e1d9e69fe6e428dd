#!/usr/bin/env bash
# Streams a worker's log (default worker 0, the one that writes jaxft's metrics
# and messages). Ctrl-C stops following; the run goes on.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: tpu/logs.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P] [--worker=0] [--log=jaxft.log]

  --worker   which worker's log (default 0)
  --log      the log file in the worker's home directory, as given to launch.sh
  --dry-run  print the gcloud command instead of running it
USAGE
}

NAME="" ZONE="" WORKER=0 LOG=jaxft.log
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --tpu=*) NAME=$(value_of "$arg") ;;
    --zone=*) ZONE=$(value_of "$arg") ;;
    --project=*) PROJECT=$(value_of "$arg") ;;
    --worker=*) WORKER=$(value_of "$arg") ;;
    --log=*) LOG=$(value_of "$arg") ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done
require "$NAME" tpu
require "$ZONE" zone
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker number, not '$WORKER'"
[[ -n $LOG && $LOG != /* ]] || die "--log is a file name in the worker's home directory"
location_flags
quote "$LOG"
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$WORKER" \
  --command="tail -n 100 -F ~/$REPLY"
