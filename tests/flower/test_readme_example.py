"""The README's SignMajorityVote example runs as written, against our ClientApp handler."""

import re
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from dpsign_fl.flower.inprocess import InProcessGrid

from ..test_settings import pyproject_defaults

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- example: server-app[^>]*-->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "README lost its server-app example"
    return match.group(1)


pytestmark = pytest.mark.usefixtures("server_identity")


def test_readme_server_app_example_trains_with_every_client_voting(capsys):
    namespace = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    run_config = dict(pyproject_defaults(), **{"num-server-rounds": 3, "model-seed": 5, "reproducible-noise": True, "noise-seed": 5})
    grid = InProcessGrid(run_config, 3)
    main = namespace["main"]
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    assert "voters per round: [3, 3, 3]" in capsys.readouterr().out
