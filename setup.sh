#!/usr/bin/env bash
# One command from a fresh clone: system packages (where we may), .venv/ with everything, then the monitor on
# its embedded default (microphone if present, else a generated Spanish demo; embedded MQTT broker if none runs).
# SETUP_ONLY=1 skips the demo run. Arguments go to `emotion-monitor run`.
# One line per step; what apt and pip print goes to .venv/setup.log, shown only when a step fails.
set -euo pipefail
cd "$(dirname "$0")"

mkdir -p .venv
log=.venv/setup.log
: >"$log"

# pip's configuration on some machines names index folders that do not exist, and pip warns about each of them
# for every package; such lines are left out of what a failure shows (they stay in the log).
show_log() {  # show_log FIRST_LINE: the end of what the log holds from that line on
  echo "--- last lines of $log:" >&2
  tail -n +"$1" "$log" | grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$" |
    tail -n 30 >&2 || true
  echo "--- full output: $log" >&2
}

# step MESSAGE COMMAND...: one line; the command's output goes to the log; a failure shows the log and ends setup.
step() {
  local message=$1 start=$SECONDS rc=0 first
  shift
  printf '%s ... ' "$message"
  first=$(($(wc -l <"$log") + 1))
  echo "=== $message: $*" >>"$log"
  "$@" >>"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "failed (exit $rc)"
    show_log "$first"
    echo "setup.sh: '$*' failed with exit status $rc" >&2
    exit "$rc"
  fi
  echo "ok ($((SECONDS - start)) s)"
}

# optional_step MESSAGE CONSEQUENCE COMMAND...: the same, but a failure only says what is missing and goes on.
optional_step() {
  local message=$1 consequence=$2 start=$SECONDS
  shift 2
  printf '%s ... ' "$message"
  echo "=== $message: $*" >>"$log"
  if "$@" >>"$log" 2>&1; then
    echo "ok ($((SECONDS - start)) s)"
  else
    echo "failed: $consequence; see $log"
  fi
}

apt_install() {
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

apt_packages=(portaudio19-dev espeak-ng sox libsox-fmt-mp3 mosquitto mosquitto-clients chromium)
if command -v apt-get >/dev/null; then
  missing=()
  for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    optional_step "system packages: installing ${missing[*]}" \
      "no root? the microphone, the demo or some tests may be unavailable" apt_install "${missing[@]}"
  else
    echo "system packages: all present"
  fi
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [ -x .venv/bin/python ]; then
  echo ".venv: exists ($(.venv/bin/python --version))"
else
  step ".venv: creating with $python" "$python" -m venv .venv
fi
step "pip: upgrading" .venv/bin/python -m pip install --upgrade pip

# torch is only needed by the training recipes, so a failure here is a warning, not the end of setup.
optional_step "torch 2.13.0 (CPU): installing" "only the training recipes need it" \
  .venv/bin/python -m pip install torch==2.13.0

extras="dev,train"
dpkg -s portaudio19-dev >/dev/null 2>&1 && extras="$extras,mic"
step "emotion-monitor with extras $extras: installing" .venv/bin/python -m pip install -e ".[$extras]"

if [ "${SETUP_ONLY:-0}" = 1 ]; then
  echo "ready: .venv/bin/emotion-monitor run starts the monitor; the tests: .venv/bin/python -m pytest -q -rs"
  exit 0
fi
echo "running .venv/bin/emotion-monitor run${*:+ $*} (microphone, else a Spanish demo); Ctrl-C stops it." \
  "Watch the events in another terminal: mosquitto_sub -t 'emotion/#' -v"
exec .venv/bin/emotion-monitor run "$@"
