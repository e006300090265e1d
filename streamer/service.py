"""`emotion-monitor install-service`: a systemd user unit that runs the desktop daemon at login."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

UNIT_NAME = "emotion-monitor.service"


class ServiceError(RuntimeError):
    """The unit was written but could not be enabled; the message says what to do instead."""


def unit_text(args: list[str]) -> str:
    """The unit running `run` with `args`; with --buffer-offline, since at login the network (and the broker)
    may come up after the monitor."""
    executable = shutil.which("emotion-monitor") or f"{sys.executable} -m streamer"
    buffering = [] if "--buffer-offline" in args else ["--buffer-offline"]
    command = " ".join([executable, "run", *buffering, *map(shlex.quote, args)])
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


ENABLE = f"systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME.removesuffix('.service')}"


def has_user_bus(env: dict[str, str] | None = None) -> bool:
    """Whether `systemctl --user` can reach this user's systemd: it needs the session bus of a login session."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR")
    return bool(env.get("DBUS_SESSION_BUS_ADDRESS")) or bool(runtime and Path(runtime, "bus").exists())


def install(args: list[str], enable: bool) -> Path:
    path = unit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit_text(args))
    if not enable:
        return path
    if not has_user_bus():
        raise ServiceError(
            f"wrote {path}, but there is no systemd user bus to enable it (XDG_RUNTIME_DIR and DBUS_SESSION_BUS_ADDRESS"
            " unset: under sudo or su, in a container, or over ssh without a login session). Log in as this user"
            f" (or run `loginctl enable-linger {os.environ.get('USER', '$USER')}` as root) and run: {ENABLE}"
        )
    for cmd in (["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", UNIT_NAME]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise ServiceError(f"wrote {path}, but `{' '.join(cmd)}` failed: {done.stderr.strip()}")
    return path
