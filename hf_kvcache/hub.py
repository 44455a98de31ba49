"""Is the Hugging Face hub reachable? Asked before anything that would otherwise retry for a minute."""

import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when offline mode is set or the hub host does not accept a TCP connection within `timeout`."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes", "on"):
            return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
