"""The README stays true: its test command is what CI runs, its TOML examples parse."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.config import parse_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
TEST_COMMAND = "python -m pip install -e '.[test]' && python -m pytest"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    assert TEST_COMMAND in README
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == TEST_COMMAND


def test_readme_starts_with_install_and_serve() -> None:
    quickstart = README.split("## Quickstart", 1)[1]
    assert "python -m pip install . && orchgate serve\n" in quickstart


def test_every_toml_example_in_the_readme_parses() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README, re.S)
    assert len(blocks) >= 3
    for block in blocks:
        config = parse_config(block, env={})
        # a block shows pools, catalog recipes or the cluster section (a fragment beside pools)
        assert (
            config.pools
            or (config.catalog is not None and config.catalog.recipes)
            or config.cluster is not None
        )
