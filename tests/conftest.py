"""Test setup: 8 fake CPU devices for sharding tests, and the reference data (never copied into code)."""

import json
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"
VENDORED_REFERENCE = REPO / "tests" / "reference"


def reference_dir() -> pathlib.Path:
    """../shared/reference when present (and then the vendored copies must match), else tests/reference."""
    if SHARED_REFERENCE.is_dir():
        for f in SHARED_REFERENCE.iterdir():
            vendored = VENDORED_REFERENCE / f.name
            assert vendored.read_bytes() == f.read_bytes(), f"{vendored} differs from {f}"
        return SHARED_REFERENCE
    return VENDORED_REFERENCE


@pytest.fixture(scope="session")
def cerebras_reference() -> dict:
    """reference/cerebras_gpt.json: the Cerebras-GPT family table, μP rules and the compute law."""
    return json.loads((reference_dir() / "cerebras_gpt.json").read_text())


@pytest.fixture(scope="session")
def chinchilla_points_path() -> pathlib.Path:
    """reference/chinchilla_fig4_points.csv: 245 (params, FLOPs, tokens, loss) points."""
    return reference_dir() / "chinchilla_fig4_points.csv"


@pytest.fixture(scope="session")
def cerebras_pile_losses_path() -> pathlib.Path:
    """tests/reference/cerebras_gpt_pile_losses.csv: the seven SP models' training FLOPs and Pile test loss."""
    return VENDORED_REFERENCE / "cerebras_gpt_pile_losses.csv"
