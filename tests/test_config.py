"""Config: strict, typed, refuses to start when wrong, and says where."""

from __future__ import annotations

import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest

from gateway.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
[server]
bind = "127.0.0.1:8080"

[auth]
token = "t0k"

[[pools]]
id = "chat"
models = ["smollm2-135m"]
queue_capacity = 64

[[pools.replicas]]
id = "r0"
engine = "llamacpp"
url = "http://127.0.0.1:8081"
slots = 4
"""


def test_the_spec_minimum_parses() -> None:
    config = parse_config(MINIMAL, env={})
    assert config.pools[0].replicas[0].slots == 4
    assert config.auth.token == "t0k"


def test_the_shipped_example_parses() -> None:
    config = load_config(REPO / "orchgate.example.toml", env={})
    assert [p.id for p in config.pools] == ["chat", "qwen", "remote"]


def test_unknown_key_names_its_path() -> None:
    with pytest.raises(ConfigError, match=r"unknown field `slotz`.*pools\[0\]\.replicas\[0\]"):
        parse_config(MINIMAL.replace("slots = 4", "slotz = 4"), env={})
    with pytest.raises(ConfigError, match=r"`bnd`.*\$\.server"):
        parse_config(MINIMAL.replace("bind =", "bnd ="), env={})


def test_wrong_type_names_its_path() -> None:
    with pytest.raises(ConfigError, match=r"Expected `int.*pools\[0\]\.queue_capacity"):
        parse_config(MINIMAL.replace("queue_capacity = 64", 'queue_capacity = "64"'), env={})


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match=r"missing required field `url`"):
        parse_config(MINIMAL.replace('url = "http://127.0.0.1:8081"', ""), env={})


def test_unknown_engine() -> None:
    with pytest.raises(ConfigError, match=r"Invalid value 'tgi'.*engine"):
        parse_config(MINIMAL.replace('"llamacpp"', '"tgi"'), env={})


def test_non_loopback_bind_without_token_refuses() -> None:
    text = MINIMAL.replace("127.0.0.1:8080", "0.0.0.0:8080").replace('token = "t0k"', "")
    with pytest.raises(ConfigError, match="not loopback"):
        parse_config(text, env={})
    # with a token (file or environment) it is allowed
    assert parse_config(text, env={"ORCHGATE_API_TOKEN": "x"}).auth.token == "x"


def test_env_token_overrides_file() -> None:
    assert parse_config(MINIMAL, env={"ORCHGATE_API_TOKEN": "from-env"}).auth.token == "from-env"


def test_duplicate_ids_and_shared_models_are_rejected() -> None:
    doubled = MINIMAL + MINIMAL[MINIMAL.index("[[pools]]") :]
    with pytest.raises(ConfigError, match="duplicate pool id"):
        parse_config(doubled, env={})
    with pytest.raises(ConfigError, match="already served by pool"):
        parse_config(doubled.replace('id = "chat"', 'id = "other"', 1), env={})


def test_bad_bind_and_bad_toml() -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_config(MINIMAL.replace("127.0.0.1:8080", "localhost"), env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[server", env={})


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    result = run_cli("check-config", str(good))
    assert result.returncode == 0 and "OK" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace("slots = 4", "slotz = 4"))
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2 and "slotz" in result.stderr
    assert run_cli("check-config", str(tmp_path / "missing.toml")).returncode == 2


def test_serve_refuses_public_bind_without_token(tmp_path: Path) -> None:
    path = tmp_path / "public.toml"
    path.write_text(MINIMAL.replace("127.0.0.1:8080", "0.0.0.0:8080").replace('token = "t0k"', ""))
    import os

    env = {k: v for k, v in os.environ.items() if k != "ORCHGATE_API_TOKEN"}
    result = run_cli("serve", "--config", str(path), env=env)
    assert result.returncode == 2
    assert "refusing to serve without auth" in result.stderr


def _config_keys(struct: type, prefix: str = "") -> list[str]:
    """Every leaf key of the config, spelled as the README's reference table spells it."""

    def plain(kind: Any) -> Any:
        return typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind

    def is_struct(kind: Any) -> bool:
        return isinstance(kind, type) and issubclass(kind, msgspec.Struct)

    keys = []
    for field in msgspec.structs.fields(struct):
        kind = plain(field.type)
        optional = [a for a in typing.get_args(kind) if a is not type(None)]
        union = typing.get_origin(kind) in (typing.Union, types.UnionType)
        if union and len(optional) == 1 and is_struct(plain(optional[0])):
            kind = plain(optional[0])  # an optional section: [catalog]
        if typing.get_origin(kind) is dict and is_struct(plain(typing.get_args(kind)[1])):
            keys += _config_keys(plain(typing.get_args(kind)[1]), f"{prefix}{field.name}.<id>.")
            continue
        item = plain(typing.get_args(kind)[0]) if typing.get_origin(kind) is list else None
        if is_struct(item):
            keys += _config_keys(item, f"{prefix}{field.name}[].")
        elif (
            item is not None
            and typing.get_args(item)
            and all(map(is_struct, typing.get_args(item)))
        ):
            for engine in typing.get_args(item):  # replicas: one struct per engine
                keys += [
                    k for k in _config_keys(engine, f"{prefix}{field.name}[].") if k not in keys
                ]
        elif is_struct(kind):
            keys += _config_keys(kind, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def test_every_config_key_is_documented_in_the_readme_and_the_example() -> None:
    from gateway.config import Config

    readme = (REPO / "README.md").read_text()
    example = (REPO / "orchgate.example.toml").read_text()
    keys = _config_keys(Config)
    assert "pools[].retry.attempts" in keys and "server.cors.max_age_s" in keys
    # a variant's replicas take the keys of a pool's replicas; the README says so once
    keys = [k.replace("variants[].replicas[]", "replicas[]") for k in keys]
    assert "`pools[].variants[].replicas`" in readme
    undocumented = [k for k in keys if f"`{k}`" not in readme and f"`{k} " not in readme]
    assert undocumented == [], "README configuration reference lacks these keys"
    leaf_names = {k.rsplit(".", 1)[-1] for k in keys}
    missing = [n for n in leaf_names if not re.search(rf"^#? ?{n} =", example, re.M)]
    assert missing == [], "orchgate.example.toml lacks these keys"


def test_cors_wildcard_with_credentials_is_refused() -> None:
    with pytest.raises(ConfigError, match="allow_credentials"):
        parse_config(
            MINIMAL + '\n[server.cors]\nallow_origins = ["*"]\nallow_credentials = true\n', env={}
        )
