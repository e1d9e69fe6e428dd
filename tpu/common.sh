# shellcheck shell=bash
# Shared by the tpu/ scripts: errors, flag values, and dry-run aware execution.

DRY_RUN=0
PROJECT=""

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# The value of a --flag=value argument.
value_of() {
  printf '%s' "${1#*=}"
}

# Runs a command, or with --dry-run prints it shell-quoted (pasteable) instead.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    local out
    printf -v out '%q ' "$@"
    echo "${out% }"
  else
    "$@"
  fi
}

require() {  # require VALUE FLAG
  [[ -n $1 ]] || die "--$2 is required (see --help)"
}

# gcloud flags every script passes: zone, and project when given.
location_flags() {
  LOCATION=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then
    LOCATION+=("--project=$PROJECT")
  fi
}
