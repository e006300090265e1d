"""Live web dashboard: one MQTT subscription on `emotion/v1/#`, fanned out to browsers over Server-Sent Events."""

from streamer.dashboard.server import Dashboard, DashboardState

__all__ = ["Dashboard", "DashboardState"]
