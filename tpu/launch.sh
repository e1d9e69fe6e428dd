#!/usr/bin/env bash
# Runs one command (jaxft train ...) on every worker of a TPU VM slice, in the
# checkout and venv setup.sh made. Each worker runs it in the background under
# nohup with its output in ~/jaxft.log, so a dropped ssh session does not stop
# training. All workers run the same command; on a TPU VM slice JAX's
# distributed runtime finds the other workers by itself, so no extra flags.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: tpu/launch.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P] [--log=jaxft.log] -- COMMAND...

  e.g. tpu/launch.sh --tpu=ft1 --zone=us-east5-b -- \\
         jaxft train --config=configs/classify.py --workdir=/tmp/run1

  COMMAND    runs in ~/jaxft with its .venv active; quote its arguments as you
             would locally, they reach every worker unchanged
  --log      file in each worker's home directory for the output (default
             jaxft.log; it is overwritten)
  --dry-run  print the gcloud command instead of running it

  On a multi-host slice the --workdir must be storage every worker sees at the
  same path (see tpu/README.md).
USAGE
}

NAME="" ZONE="" LOG=jaxft.log
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --tpu=*) NAME=$(value_of "$1") ;;
    --zone=*) ZONE=$(value_of "$1") ;;
    --project=*) PROJECT=$(value_of "$1") ;;
    --log=*) LOG=$(value_of "$1") ;;
    --) shift; break ;;
    *) die "unknown argument: $1 (the command goes after --)" ;;
  esac
  shift
done
require "$NAME" tpu
require "$ZONE" zone
[[ $# -gt 0 ]] || die "no command after -- (e.g. -- jaxft train --config=configs/classify.py --workdir=...)"
[[ -n $LOG && $LOG != /* ]] || die "--log is a file name in the worker's home directory"
location_flags
quote_all "$@"
COMMAND=$REPLY
quote "$LOG"
# The worker's shell expands ~, not this one.
# shellcheck disable=SC2088
LOGFILE="~/$REPLY"
# Braces: only the command goes to the background, so a missing checkout or
# venv fails the ssh (and this script) instead of vanishing into the log.
REMOTE="cd ~/jaxft && . .venv/bin/activate"
REMOTE+=" && { nohup $COMMAND > $LOGFILE 2>&1 < /dev/null & } && echo \"started on \$(hostname), log $LOGFILE\""
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$REMOTE"
