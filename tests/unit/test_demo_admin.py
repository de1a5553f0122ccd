"""`make run` (serve --demo) gives a newcomer a dashboard login: a random admin password kept in a
file only its owner can read, created once, never when an admin password is configured."""

from __future__ import annotations

import stat

from sqlalchemy import select

from cli.demo import ensure_demo_admin
from common.config import load_settings
from common.jobstore.db import session_scope
from common.jobstore.models import User, UserRole
from service.api.auth import authenticate


def test_demo_admin_created_once_with_private_password_file(data_dir):
    settings = load_settings(data_dir=data_dir)
    user, secret = ensure_demo_admin(settings)
    assert user == "admin"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = secret.read_text().strip()
    assert len(password) >= 12
    with session_scope(settings.effective_database_url) as s:
        rows = s.scalars(select(User)).all()
        assert [(u.username, u.role) for u in rows] == [("admin", UserRole.ADMIN)]
        assert authenticate(s, "admin", password) is not None
    # second start: same account, same password file
    assert ensure_demo_admin(settings) == (user, secret)
    assert secret.read_text().strip() == password
    with session_scope(settings.effective_database_url) as s:
        assert len(s.scalars(select(User)).all()) == 1


def test_no_demo_admin_when_password_configured(data_dir, monkeypatch):
    monkeypatch.setenv("SYNTHPERF_ADMIN_PASSWORD", "a-configured-password-123")
    settings = load_settings(data_dir=data_dir)
    assert ensure_demo_admin(settings) is None
    assert not (data_dir / "demo" / "admin-password.txt").exists()
