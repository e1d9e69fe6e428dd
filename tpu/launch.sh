#!/usr/bin/env bash
# Runs one command (e.g. jaxft train ...) on every worker of a TPU VM slice.
# Each worker runs it under nohup with its output in ~/jaxft.log, so a dropped
# ssh session does not stop training; JAX joins the workers by itself on TPU.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: tpu/launch.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P] -- jaxft train ...

  Use a workdir every worker sees (gs://BUCKET/...) for multi-host slices.
  --dry-run  print the gcloud command instead of running it
USAGE
}

NAME="" ZONE=""
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --tpu=*) NAME=$(value_of "$1") ;;
    --zone=*) ZONE=$(value_of "$1") ;;
    --project=*) PROJECT=$(value_of "$1") ;;
    --) shift; break ;;
    *) die "unknown argument: $1 (the command goes after --)" ;;
  esac
  shift
done
require "$NAME" tpu
require "$ZONE" zone
[[ $# -gt 0 ]] || die "no command after -- (e.g. -- jaxft train --config=configs/classify.py ...)"
location_flags
printf -v COMMAND '%q ' "$@"
REMOTE="cd ~/jaxft && . .venv/bin/activate && nohup ${COMMAND% } > ~/jaxft.log 2>&1 < /dev/null &"
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$REMOTE"
