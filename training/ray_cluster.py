"""Connecting to Ray: a cluster at an address, checked to answer first (``ray.init`` waits for minutes on an
address where nothing runs, printing only Ray's own warnings), or a local Ray."""

from __future__ import annotations

import os
import socket
from typing import Any

from training.errors import ConfigError


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A :class:`ConfigError` unless something accepts connections at ``HOST:PORT`` or ``ray://HOST:PORT``
    (``auto`` and ``local`` are Ray's to find)."""
    target = address.removeprefix("ray://")
    if target in ("auto", "local"):
        return
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address '{address}': expected HOST:PORT (the head's GCS, e.g. 10.0.0.1:6379), "
                          "ray://HOST:PORT (Ray client) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at '{address}' ({exc.strerror or 'timed out'}): is "
                          "`ray start --head` running there, and the port open?") from None


def connect_error(address: str, exc: BaseException) -> str:
    """The one-line error of a failed ``ray.init(address=...)``, with a token-authentication hint when this
    client does not use it (Ray then fails with only ``Unauthenticated`` / ``InvalidAuthToken`` log lines)."""
    detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    msg = f"cannot connect to the Ray cluster at '{address}': {detail}"
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        msg += ("; the cluster may use token authentication: export RAY_AUTH_MODE=token and the cluster's token as "
                "RAY_AUTH_TOKEN=... or RAY_AUTH_TOKEN_PATH=FILE (default ~/.ray/auth_token; `ray get-auth-token` "
                "on the head prints it)")
    return msg


def connect(address: str | None, **init_kwargs: Any) -> bool:
    """Connect to the cluster at ``address`` (checked first), or start a local Ray (no dashboard) when it is None;
    returns whether this call initialised Ray (an initialised Ray is used as it is)."""
    import ray

    if ray.is_initialized():
        return False
    if not address:
        ray.init(**{"include_dashboard": False, **init_kwargs})
        return True
    from ray.exceptions import AuthenticationError

    check_reachable(address)
    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, RuntimeError, AuthenticationError) as exc:
        raise ConfigError(connect_error(address, exc)) from None
    return True
