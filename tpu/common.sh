# shellcheck shell=bash
# Shared by the tpu/ scripts: errors, flag values, quoting and dry-run aware
# execution. Kept to bash 3.2 (macOS's /bin/bash): no empty "${array[@]}" under
# set -u, no associative arrays, no ${x,,}.

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

# Sets REPLY to WORD as a shell reads it back: bare when it is made of safe
# characters, else in single quotes, or in double quotes when it holds single
# quotes and nothing double quotes would expand. In --flag=VALUE only VALUE is
# quoted, so a command reads the way one would type it.
quote() {
  local word=$1 prefix="" sq="'\\''"
  if [[ $word =~ ^--[A-Za-z0-9_.-]+= ]]; then
    prefix=${BASH_REMATCH[0]}
    word=${word#"$prefix"}
  fi
  if [[ -n $word && $word != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    REPLY=$prefix$word
  elif [[ $word != *"'"* ]]; then
    REPLY="$prefix'$word'"
  elif [[ $word != *[\"\$\`\\!]* ]]; then
    REPLY="$prefix\"$word\""
  else
    REPLY="$prefix'${word//"'"/$sq}'"
  fi
}

# Sets REPLY to the words, each quoted, joined by spaces: a pasteable command.
quote_all() {
  local line="" word
  for word in "$@"; do
    quote "$word"
    line+="$REPLY "
  done
  REPLY=${line% }
}

# Runs a command, or with --dry-run prints it (one line, pasteable) instead.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_all "$@"
    printf '%s\n' "$REPLY"
  else
    "$@"
  fi
}

require() {  # require VALUE FLAG
  [[ -n $1 ]] || die "--$2 is required (see --help)"
}

# Sets LOCATION to the gcloud flags every script passes: zone, and project when given.
location_flags() {
  LOCATION=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then
    LOCATION+=("--project=$PROJECT")
  fi
}
