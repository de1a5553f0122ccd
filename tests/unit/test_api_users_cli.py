"""`synthperf users`: accounts made on the command line log in to the dashboard; passwords come
from stdin, bad input is refused with a message, every change is audited."""

from __future__ import annotations

import io
import re

from fastapi.testclient import TestClient
from sqlalchemy import select

from cli.main import main
from common.config import load_settings
from common.jobstore.db import session_scope
from common.jobstore.models import AuditEntry, User
from service.api.app import create_app


def _run(monkeypatch, argv: list[str], stdin: str = "") -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["users", *argv])


def test_users_cli_roundtrip(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("SYNTHPERF_DATA_DIR", str(data_dir))
    assert _run(monkeypatch, ["add", "night.admin", "--role", "admin"], "a long password 1\n") == 0
    assert _run(monkeypatch, ["add", "night.admin"], "a long password 1\n") == 2
    assert "already exists" in capsys.readouterr().err
    assert _run(monkeypatch, ["add", "shorty"], "short\n") == 2
    assert "at least" in capsys.readouterr().err
    assert _run(monkeypatch, ["add", "bad name!"], "a long password 1\n") == 2
    assert _run(monkeypatch, ["passwd", "night.admin"], "a new long password\n") == 0
    assert _run(monkeypatch, ["add", "reader"], "reader password\n") == 0
    assert _run(monkeypatch, ["disable", "reader"]) == 0
    capsys.readouterr()
    assert _run(monkeypatch, ["list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^night\.admin\tadmin\tactive", listing, re.M)
    assert re.search(r"^reader\tviewer\tdisabled", listing, re.M)

    settings = load_settings(data_dir=data_dir, secret_key="s" * 32)
    with session_scope(settings.effective_database_url) as db:
        user = db.scalar(select(User).where(User.username == "night.admin"))
        assert user.password_hash.startswith("$argon2id$") and "long password" not in user.password_hash
        actions = [a.action for a in db.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert actions == ["user_add", "user_passwd", "user_add", "user_disable"]

    with TestClient(create_app(settings)) as c:
        def try_login(name: str, pw: str) -> int:
            token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
            return c.post("/login", data={"username": name, "password": pw, "csrf_token": token},
                          follow_redirects=False).status_code

        assert try_login("night.admin", "a long password 1") == 401  # changed by passwd
        assert try_login("reader", "reader password") == 401  # disabled
        assert try_login("night.admin", "a new long password") == 303
        assert c.get("/api/me").json()["role"] == "admin"
