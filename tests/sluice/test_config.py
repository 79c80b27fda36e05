from __future__ import annotations

from pathlib import Path

import pytest

from sluice import config as config_mod
from sluice.config import ConfigError, parse_duration


def test_durations() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("15m") == 900
    assert parse_duration("72h") == 72 * 3600
    assert parse_duration(3) == 3.0
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "sluice.toml"
    f.write_text('[ingest]\nhttp_listen = "0.0.0.0:9000"\n[retry]\nladder = ["1m", "5m"]\n')
    cfg = config_mod.load(
        f,
        environ={
            "SLUICE_INGEST__MAX_RECIPIENTS": "7",
            "SLUICE_DNS__NAMESERVERS": "10.0.0.1,10.0.0.2",
        },
    )
    assert cfg.ingest.http_listen == "0.0.0.0:9000"
    assert cfg.ingest.max_recipients == 7
    assert cfg.retry.ladder == (60.0, 300.0)
    assert cfg.dns.nameservers == ("10.0.0.1", "10.0.0.2")
    assert float(cfg.retry.horizon_transactional) == 72 * 3600.0  # default kept


def test_unknown_keys_name_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "sluice.toml"
    f.write_text('[ingest]\nhttp_lsten = "x"\n')
    with pytest.raises(ConfigError, match=r"sluice.toml: unknown key 'http_lsten' in \[ingest\]"):
        config_mod.load(f, environ={})
    f.write_text("[ingets]\n")
    with pytest.raises(ConfigError, match=r"unknown section \[ingets\]"):
        config_mod.load(f, environ={})
    with pytest.raises(ConfigError, match="environment: unknown key 'nope'"):
        config_mod.load(None, environ={"SLUICE_INGEST__NOPE": "1"})
    with pytest.raises(ConfigError, match="max_recipients"):
        config_mod.load(None, environ={"SLUICE_INGEST__MAX_RECIPIENTS": "many"})


def test_shipped_example_config_loads() -> None:
    root = Path(__file__).resolve().parents[2]
    cfg = config_mod.load(root / "sluice.example.toml", environ={})
    assert cfg == config_mod.Config(), "sluice.example.toml must document the defaults"


def test_every_key_is_documented() -> None:
    import dataclasses

    root = Path(__file__).resolve().parents[2]
    reference = (root / "docs" / "config.md").read_text()
    example = (root / "sluice.example.toml").read_text()
    for section in dataclasses.fields(config_mod.Config):
        assert f"[{section.name}]" in example, section.name
        for key in dataclasses.fields(getattr(config_mod.Config(), section.name)):
            assert f"`[{section.name}] {key.name}`" in reference, (section.name, key.name)
            assert f"\n{key.name} = " in example, (section.name, key.name)
