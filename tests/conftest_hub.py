"""Pytest fixture for the loopback Hub stub (see tests/hub_stub.py).

Not auto-loaded (it is not conftest.py): import the fixture into a test module with
``from conftest_hub import hub`` (or re-export it from tests/conftest.py).
"""

from __future__ import annotations

import pytest

try:
    from hub_stub import HubStub, hub_env
except ImportError:  # tests/ imported as a package
    from tests.hub_stub import HubStub, hub_env


@pytest.fixture
def hub(monkeypatch, tmp_path) -> HubStub:
    """A running `HubStub`; huggingface_hub / transformers / PEFT point at it for the duration of the test.

    HF_HOME is ``tmp_path / "hf_home"`` (cache in ``.../hub``); everything is restored at teardown.
    """
    with hub_env(monkeypatch, home=tmp_path / "hf_home") as stub:
        yield stub
