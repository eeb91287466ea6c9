"""Which client code a SuperNode runs (Flower 1.42), as docs/deployment.md describes it.

The privacy guarantee holds for client code the device owner trusts. These
tests pin down, offline and in seconds, the two facts the docs rest on:

- the ClientApp runs from the app bundle the server sent, and the bundle's own
  ``dpsign_fl`` is imported before a copy installed on the device;
- ``flower-supernode --trusted-entities`` accepts a bundle only when a trusted
  Ed25519 key signed the SHA-256 of its exact bytes.

The deployment itself (a SuperNode with ``--trusted-entities`` refusing the
unsigned bundle of ``flwr run .``) is tests/e2e/test_device_settings.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.supercore.fab import Fab
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, sign_message
from flwr.supernode.start_client_internal import _verify_fab

REPO = Path(__file__).resolve().parents[2]

# What flwr-clientapp does with the bundle it pulls from its SuperNode
# (flwr/supernode/runtime/run_clientapp.py): install it under $FLWR_HOME/apps,
# then load the ClientApp named in the bundle's pyproject.toml from there.
LOAD_LIKE_FLWR_CLIENTAPP = """
import hashlib, sys
from flwr.cli.build import build_fab_from_files
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn

files = {
    "pyproject.toml": b'''
[project]
name = "probe"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "probe"

[tool.flwr.app.components]
serverapp = "client_app:app"
clientapp = "client_app:app"

[tool.flwr.app.config]
''',
    "client_app.py": b"import dpsign_fl\\nfrom flwr.clientapp import ClientApp\\napp = ClientApp()\\n",
}
if sys.argv[1] == "with-own-copy":
    files["dpsign_fl/__init__.py"] = b"# the bundle's dpsign_fl\\n"
fab = build_fab_from_files(files)[0]
install_from_fab(fab, skip_prompt=True)
get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)("probe/probe", "1.0.0", hashlib.sha256(fab).hexdigest())
print("dpsign_fl imported from", sys.modules["dpsign_fl"].__file__)
"""


def imported_dpsign_fl(tmp_path: Path, bundle: str) -> Path:
    """Where the ClientApp of a bundle imports ``dpsign_fl`` from, with this repository's copy installed."""
    home = tmp_path / bundle
    env = dict(os.environ, FLWR_HOME=str(home), PYTHONPATH=str(REPO))  # REPO stands for the device's installed copy
    done = subprocess.run(
        [sys.executable, "-c", LOAD_LIKE_FLWR_CLIENTAPP, bundle], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.split("dpsign_fl imported from ")[-1].strip())


def test_a_bundles_own_dpsign_fl_is_imported_instead_of_the_installed_one(tmp_path):
    installed = imported_dpsign_fl(tmp_path, "without-own-copy")
    shipped = imported_dpsign_fl(tmp_path, "with-own-copy")

    assert installed == REPO / "dpsign_fl" / "__init__.py"  # control: no copy in the bundle
    assert shipped.is_relative_to(tmp_path / "with-own-copy" / "apps"), shipped


def signed_fab(content: bytes, key: ed25519.Ed25519PrivateKey, key_id: str) -> Fab:
    """A FAB with the verification record the SuperLink passes on from Flower Hub (``_format_verification``)."""
    signed_at = 1_700_000_000
    signature = sign_message(key, create_message_to_sign(hashlib.sha256(content).digest(), signed_at))
    record = {"signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(), "signed_at": signed_at}
    return Fab(hashlib.sha256(content).hexdigest(), content, {key_id: json.dumps(record), "valid_license": "Valid"})


def openssh(key: ed25519.Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def test_trusted_entities_accept_only_the_exact_bytes_a_trusted_key_signed():
    reviewer, stranger = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    trusted = {"fpk_reviewer": openssh(reviewer)}
    reviewed = b"PK reviewed bundle bytes"
    fab = signed_fab(reviewed, reviewer, "fpk_reviewer")

    assert _verify_fab(fab, trusted)
    changed = Fab(fab.hash_str, reviewed[:-1] + b"!", fab.verifications)  # one byte of the bundle changed
    assert not _verify_fab(changed, trusted)
    assert not _verify_fab(signed_fab(reviewed, stranger, "fpk_reviewer"), trusted)  # right ID, wrong key
    assert not _verify_fab(signed_fab(reviewed, stranger, "fpk_stranger"), trusted)  # a key not in the file
