"""The llm extra is optional: neither the core nor the Flower adapter imports transformers or peft.

Checked in a fresh interpreter, so that modules other tests imported cannot hide an import.
Runs with or without the extra installed.
"""

import json
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import importlib.util, json, sys
import torch
import dpsign_fl, dpsign_fl.llm, dpsign_fl.flower, dpsign_fl.flower.llm
from dpsign_fl.flower import dp_sign_train, adapter_arrays, save_adapters
recognised = dpsign_fl.llm.is_causal_lm(torch.nn.Linear(2, 2))
before = sorted(name for name in ("transformers", "peft") if name in sys.modules)
try:
    import peft
except ImportError:
    pass
after = sorted(name for name in ("transformers", "peft") if name in sys.modules)
installed = sorted(name for name in ("transformers", "peft") if importlib.util.find_spec(name) is not None)
print(json.dumps({"before": before, "after": after, "installed": installed, "recognised": recognised}))
"""


def test_the_package_and_its_flower_adapter_load_without_transformers_or_peft():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["before"] == [] and report["recognised"] is False
    # Negative control: where the extra is installed, the same check sees it once peft is imported.
    assert report["after"] == report["installed"]
