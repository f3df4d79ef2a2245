"""Shared fixtures: a tiny synthetic dataset made by the project's own generator, and free ports."""

import logging
import socket
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """demo preset at 2 % scale: 6k train / 1k val / 2k test rows, 100 users, 50 items (seconds)."""
    from cstwa_dist.data.synth import generate

    out = tmp_path_factory.mktemp("data") / "tiny"
    generate("demo", 0.02, 7, out, progress=False)
    logging.getLogger(__name__).info("tiny dataset at %s", out)
    return out
