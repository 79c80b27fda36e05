from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from sluice import config as config_mod
from sluice.config import ConfigError, parse_duration

ROOT = Path(__file__).resolve().parents[2]


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
    with pytest.raises(ConfigError, match=r"environment: unknown key 'nope' in \[ingest\]"):
        config_mod.load(None, environ={"SLUICE_INGEST__NOPE": "1"})
    with pytest.raises(ConfigError, match=r"environment: unknown section \[ingets\]"):
        config_mod.load(None, environ={"SLUICE_INGETS__MAX_RECIPIENTS": "1"})
    with pytest.raises(
        ConfigError, match="environment: SLUICE_INGEST is not SLUICE_<SECTION>__<KEY>"
    ):
        config_mod.load(None, environ={"SLUICE_INGEST": "1"})
    # The file and the environment together: the file's error names the file.
    f.write_text("[store]\nurl_typo = 1\n")
    with pytest.raises(ConfigError, match=rf"{f}: unknown key 'url_typo' in \[store\]"):
        config_mod.load(f, environ={"SLUICE_STORE__URL": "s3://b"})
    with pytest.raises(ConfigError, match="max_recipients"):
        config_mod.load(None, environ={"SLUICE_INGEST__MAX_RECIPIENTS": "many"})


def test_shipped_example_config_loads() -> None:
    root = Path(__file__).resolve().parents[2]
    cfg = config_mod.load(root / "sluice.example.toml", environ={})
    assert cfg == config_mod.Config(), "sluice.example.toml must document the defaults"


def _genconfig() -> Any:
    spec = importlib.util.spec_from_file_location("genconfig", ROOT / "scripts" / "genconfig.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["genconfig"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_fresh(tmp_path: Path) -> None:
    """docs/configuration.md is what scripts/genconfig.py makes of sluice/config.py."""
    out = tmp_path / "configuration.md"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genconfig.py"), str(out)],
        check=True,
        capture_output=True,
    )
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert out.read_text() == committed, "regenerate with `python scripts/genconfig.py`"


def test_every_key_is_in_the_reference_with_a_description() -> None:
    sections = _genconfig().describe()
    assert [s.name for s in sections] == [f.name for f in dataclasses.fields(config_mod.Config)]
    undocumented = [
        f"[{s.name}] {k.name}" for s in sections for k in s.keys if len(k.doc.split()) < 2
    ]
    assert undocumented == [], "add a comment line above these fields in sluice/config.py"
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for s in sections:
        assert f"\n## [{s.name}]\n" in reference, s.name
        for k in s.keys:
            assert f"| `{k.name}` |" in reference and f"`{k.env}`" in reference, k.env
            assert k.env == f"SLUICE_{s.name.upper()}__{k.name.upper()}"


def test_the_generator_reads_the_comments() -> None:
    """Descriptions are the comments above each field, defaults come formatted as TOML."""
    gen = _genconfig()
    keys = {(k.section, k.name): k for s in gen.describe() for k in s.keys}
    dlq = keys[("nats", "dlq_max_age")]
    assert dlq.doc == "How long dead letters are kept."
    assert dlq.type == "duration" and dlq.default == '`"30d"`'
    assert keys[("retry", "ladder")].type == "list of durations"
    assert keys[("nats", "mail_max_bytes")].default == "`8589934592` (8 GiB)"
    assert keys[("webhooks", "allow_private_targets")].default == "`false`"
    assert [gen.format_duration(s) for s in (0.005, 90, 3600, 1.5)] == [
        "5ms",
        "90s",
        "1h",
        "1500ms",
    ]


def test_example_lists_exactly_the_config_keys() -> None:
    example = tomllib.loads((ROOT / "sluice.example.toml").read_text())
    defaults = config_mod.Config()
    expected = {
        section.name: {f.name for f in dataclasses.fields(getattr(defaults, section.name))}
        for section in dataclasses.fields(config_mod.Config)
    }
    found = {name: set(values) for name, values in example.items()}
    missing = {f"[{s}] {k}" for s, keys in expected.items() for k in keys - found.get(s, set())}
    unknown = {f"[{s}] {k}" for s, keys in found.items() for k in keys - expected.get(s, set())}
    assert missing == set(), "keys missing from sluice.example.toml"
    assert unknown == set(), "keys in sluice.example.toml that the config does not have"
