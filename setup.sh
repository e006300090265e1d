#!/usr/bin/env bash
# One command from a fresh clone: system packages (where we may), .venv/ with everything, then the monitor on
# its embedded default (microphone if present, else a generated Spanish demo; embedded MQTT broker if none runs).
# SETUP_ONLY=1 skips the demo run.
set -euo pipefail
cd "$(dirname "$0")"

apt_packages=(portaudio19-dev espeak-ng sox libsox-fmt-mp3 mosquitto mosquitto-clients chromium)
if command -v apt-get >/dev/null; then
  missing=()
  for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
    echo "installing system packages: ${missing[*]}"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"; } \
      >/dev/null || echo "warning: could not install ${missing[*]} (no root?); microphone/demo may be unavailable"
  fi
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0 || echo "warning: torch==2.13.0 not installed (only training recipes of issue #3 need it)"
extras="dev,train"
dpkg -s portaudio19-dev >/dev/null 2>&1 && extras="$extras,mic"
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "installed into .venv/ (extras: $extras)"

if [ "${SETUP_ONLY:-0}" != 1 ]; then
  echo "running the monitor on its embedded default; watch MQTT with: mosquitto_sub -t 'emotion/#' -v"
  exec .venv/bin/emotion-monitor run "$@"
fi
