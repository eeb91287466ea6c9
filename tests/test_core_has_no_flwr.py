"""The core never imports flwr (docs/design.md, "Layers": imports flow core -> adapter -> apps).

The check runs in a fresh interpreter, so modules that other tests imported cannot
hide or fake an import of flwr.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
NOT_CORE = ("dpsign_fl.flower", "dpsign_fl.experiments", "dpsign_fl.bench")
ADAPTER = "dpsign_fl.flower"

# Walks dpsign_fl without importing the excluded subpackages (pkgutil.walk_packages would
# import every package it recurses into), imports each module and records which top-level
# modules are loaded; THEN imports the adapter and records again (the negative control).
IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
excluded, adapter = tuple(sys.argv[1].split(",")), sys.argv[2]
imported = []

def loaded():
    return sorted({name.split(".")[0] for name in sys.modules})

def visit(name):
    if name.startswith(excluded):
        return
    module = importlib.import_module(name)
    imported.append(name)
    for info in pkgutil.iter_modules(getattr(module, "__path__", []), prefix=name + "."):
        visit(info.name)

visit("dpsign_fl")
core_loaded = loaded()
importlib.import_module(adapter)
print(json.dumps({"imported": imported, "core_loaded": core_loaded, "adapter_loaded": loaded()}))
"""


@pytest.fixture(scope="module")
def import_report():
    completed = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, ",".join(NOT_CORE), ADAPTER],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_importing_every_core_module_does_not_load_flwr(import_report):
    # The walk really covered the core ...
    core = {
        "dpsign_fl",
        "dpsign_fl.release.mechanism",
        "dpsign_fl.settings",
        "dpsign_fl.release",
        "dpsign_fl.rounds",
        "dpsign_fl.parameters",
        "dpsign_fl.evaluation",
        "dpsign_fl.vote.packing",
        "dpsign_fl.vote",
        "dpsign_fl.privacy",
        "dpsign_fl.privacy.accounting",
        "dpsign_fl.privacy.ledger",
        "dpsign_fl.privacy.limits",
        "dpsign_fl.privacy.__main__",
    }
    assert core <= set(import_report["imported"])
    assert not any(name.startswith(NOT_CORE) for name in import_report["imported"])
    # ... and none of it pulled in flwr.
    assert "flwr" not in import_report["core_loaded"], import_report["imported"]


def test_the_check_detects_flwr_once_the_adapter_is_imported(import_report):
    # Negative control: the Flower adapter does import flwr, and the same check sees it.
    assert "flwr" in import_report["adapter_loaded"]
