"""Config operations and the control socket shared by the CLI and the daemon."""

from storaged.control.client import call, daemon_running
from storaged.control.ops import OPS, ConfigError, apply, describe, parse_size
from storaged.control.server import (
    ControlServerError,
    start_control_server,
    stop_control_server,
)

__all__ = [
    "OPS", "ConfigError", "ControlServerError", "apply", "call", "daemon_running",
    "describe", "parse_size", "start_control_server", "stop_control_server",
]
