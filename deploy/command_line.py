"""What the launcher and a site's preflight both spell the same way: the choice between TLS and
``--insecure``, and a SuperNode's ``--node-config``. Its own module, so the preflight (which loads
torch and the data) and the launcher (which must not) never import each other."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping

from deploy.errors import LaunchError

INSECURE_WARNING = ("WARNING: --insecure: traffic is unencrypted and any node can join; "
                    "use it only on a trusted network, never with patient data")


def require_tls(certs_given: bool, insecure: bool, who: str) -> None:
    if certs_given and insecure:
        raise LaunchError(f"{who}: give certificates or --insecure, not both")
    if not certs_given and not insecure:
        raise LaunchError(f"{who}: no certificates given; refusing to run without TLS "
                          f"(make them with deploy/make_certs.py, or pass --insecure to accept the risk)")
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)


def node_config_string(settings: Mapping[str, object]) -> str:
    """``--node-config``'s ``key=value`` list (TOML values: quoted strings, true/false, numbers)."""
    for key, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise LaunchError(f"node config: '{key}' = {value}: must be a finite number")
    return " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())
