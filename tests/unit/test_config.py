"""Settings: precedence (defaults < YAML < env < overrides) and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import SettingsError, load_settings


def test_defaults_are_embedded(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert s.ae_title == "SYNTHPERF" and s.stable_age_s == 10.0
    assert s.allowed_networks == ["127.0.0.0/8", "::1/128"] and s.allowed_aets == []
    assert s.effective_database_url.startswith("sqlite:///") and s.spool_dir == tmp_path / "spool"
    assert s.spool_fsync is True


def test_yaml_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text("ae_title: FROMYAML\nscp_port: 104\nstable_age_s: 3\n")
    monkeypatch.setenv("SYNTHPERF_SCP_PORT", "2104")
    monkeypatch.setenv("SYNTHPERF_ALLOWED_AETS", "CT1, MR2")
    monkeypatch.setenv("SYNTHPERF_ALLOWED_NETWORKS", "10.0.0.0/8,192.168.1.0/24")
    s = load_settings(cfg, stable_age_s=1.5)
    assert s.ae_title == "FROMYAML" and s.scp_port == 2104 and s.stable_age_s == 1.5
    assert s.allowed_aets == ["CT1", "MR2"] and s.allowed_networks == ["10.0.0.0/8", "192.168.1.0/24"]


@pytest.mark.parametrize(
    "env,name",
    [
        ({"SYNTHPERF_ALLOWED_NETWORKS": "10.0.0.0/33"}, "allowed_networks"),
        ({"SYNTHPERF_AE_TITLE": "THIS_AE_TITLE_IS_FAR_TOO_LONG"}, "ae_title"),
        ({"SYNTHPERF_SCP_PORT": "70000"}, "scp_port"),
        ({"SYNTHPERF_STABLE_AGE_S": "-1"}, "stable_age_s"),
        ({"SYNTHPERF_TLS_CERT": "/nonexistent/cert.pem"}, "tls"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert name in str(err.value)


def test_missing_or_bad_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(bad)
