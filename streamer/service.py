"""`emotion-monitor install-service`: a systemd user unit that runs the desktop daemon at login."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

UNIT_NAME = "emotion-monitor.service"


def unit_text(args: list[str]) -> str:
    executable = shutil.which("emotion-monitor") or f"{sys.executable} -m streamer"
    command = " ".join([executable, "run", *map(shlex.quote, args)])
    return f"""[Unit]
Description=Emotion monitor: live speech emotion over MQTT
After=network-online.target sound.target

[Service]
ExecStart={command}
Restart=on-failure
RestartSec=5
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=default.target
"""


def unit_path() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(config_home) / "systemd" / "user" / UNIT_NAME


def install(args: list[str], enable: bool) -> Path:
    path = unit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit_text(args))
    if enable:
        for cmd in (["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", UNIT_NAME]):
            subprocess.run(cmd, check=True)
    return path
