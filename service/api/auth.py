"""Who is asking: local accounts (argon2 hashes), or a trusted reverse proxy's headers.

Two modes (``settings.auth_mode``):

* ``local`` — users in the job store's ``users`` table log in with a form; the signed session
  cookie (HttpOnly, SameSite=Lax, Secure when ``cookie_secure``) carries the username only, and the
  account is re-read on each request so disabling a user takes effect at once.
* ``proxy`` — a reverse proxy in front of the API authenticates people and sets
  ``proxy_user_header`` / ``proxy_role_header``. The API must then only be reachable through that
  proxy (bind to 127.0.0.1 or a private interface), since anyone who can reach it can set headers.

Every state-changing request also carries a CSRF token (form field ``csrf_token`` or header
``X-CSRF-Token``) equal to the one stored in the session.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from common.config import Settings
from common.jobstore.models import AuditEntry, User, UserRole

CSRF_SESSION_KEY = "csrf"
CSRF_FORM_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
USER_SESSION_KEY = "user"

_USERNAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD_LENGTH = 10

_hasher = PasswordHasher()
# Verified against when the username is unknown, so a miss costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class Principal:
    """The person behind a request."""

    username: str
    role: str
    via: str  # "local" or "proxy"

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN

    @property
    def sees_identifiers(self) -> bool:
        """Admins see patient name/ID; viewers see them masked."""
        return self.is_admin


# --------------------------------------------------------------------------- passwords and users


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def validate_username(username: str) -> str:
    if not _USERNAME.match(username or ""):
        raise ValueError(f"username {username!r} must be 1-64 letters, digits or . _ @ -")
    return username


def validate_password(password: str) -> str:
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    return password


def validate_role(role: str) -> str:
    if role not in UserRole.ALL:
        raise ValueError(f"role {role!r} must be one of {', '.join(UserRole.ALL)}")
    return role


def create_user(session: Session, username: str, password: str, role: str = UserRole.VIEWER) -> User:
    """Add a local account; raises ValueError naming the bad argument or an existing name."""
    validate_username(username)
    validate_password(password)
    validate_role(role)
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise ValueError(f"user {username!r} already exists; use 'synthperf users passwd' to change it")
    user = User(username=username, password_hash=hash_password(password), role=role)
    session.add(user)
    session.flush()
    return user


def set_password(session: Session, username: str, password: str) -> User:
    validate_password(password)
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise ValueError(f"no user {username!r}")
    user.password_hash = hash_password(password)
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The enabled user whose password matches, else None (constant-ish time either way)."""
    user = session.scalar(select(User).where(User.username == username)) if username else None
    stored = user.password_hash if user is not None else _DUMMY_HASH
    try:
        _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def ensure_first_admin(session: Session, settings: Settings) -> str | None:
    """Create ``admin_user`` from SYNTHPERF_ADMIN_PASSWORD when set and no such user exists.

    Never overwrites an existing account (change passwords with ``synthperf users passwd``).
    Returns the username created, or None.
    """
    if settings.auth_mode != "local" or settings.admin_password is None:
        return None
    password = settings.admin_password.get_secret_value()
    if not password:
        return None
    if session.scalar(select(User).where(User.username == settings.admin_user)) is not None:
        return None
    create_user(session, settings.admin_user, password, UserRole.ADMIN)
    session.add(AuditEntry(user="system", action="bootstrap_admin", target=f"user:{settings.admin_user}"))
    return settings.admin_user


def principal_from_session(session: Session, data: dict[str, Any]) -> Principal | None:
    username = data.get(USER_SESSION_KEY)
    if not isinstance(username, str):
        return None
    user = session.scalar(select(User).where(User.username == username))
    if user is None or user.disabled:
        return None
    return Principal(user.username, user.role, "local")


def principal_from_headers(settings: Settings, headers: Any) -> Principal | None:
    """Trusted proxy mode: user from ``proxy_user_header``, role from ``proxy_role_header``.

    The role header may hold a comma/space separated list of groups; "admin" among them makes an
    admin, anything else a viewer (least privilege when the proxy sends something unexpected).
    """
    username = (headers.get(settings.proxy_user_header) or "").strip()
    if not username or len(username) > 200:
        return None
    groups = re.split(r"[,\s]+", (headers.get(settings.proxy_role_header) or "").strip().lower())
    role = UserRole.ADMIN if UserRole.ADMIN in groups else UserRole.VIEWER
    return Principal(username, role, "proxy")


# --------------------------------------------------------------------------- CSRF


def csrf_token(session_data: dict[str, Any]) -> str:
    """The session's CSRF token, created on first use."""
    token = session_data.get(CSRF_SESSION_KEY)
    if not isinstance(token, str) or len(token) < 20:
        token = secrets.token_urlsafe(32)
        session_data[CSRF_SESSION_KEY] = token
    return token


def csrf_ok(session_data: dict[str, Any], presented: str | None) -> bool:
    expected = session_data.get(CSRF_SESSION_KEY)
    if not isinstance(expected, str) or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


# --------------------------------------------------------------------------- login rate limit


class LoginLimiter:
    """Failed logins per account and per client IP in a sliding window (in memory, per process).

    The two keys have separate limits: an account is refused once it has ``max_failures`` failures
    within ``window_s`` seconds (from any IP), a client IP once it has ``max_failures_per_ip``
    (for any accounts). The per-IP limit is much larger because a ward workstation or a reverse
    proxy puts many people behind one address: one person's typos lock out only their own
    account, while guessing across many accounts from one address is still stopped. A refused
    attempt gets 429 until the oldest counted failure ages out — even with the right password.
    """

    def __init__(self, max_failures: int, window_s: float, max_failures_per_ip: int | None = None) -> None:
        if max_failures < 1:
            raise ValueError(f"max_failures {max_failures} must be at least 1")
        if window_s <= 0:
            raise ValueError(f"window_s {window_s} must be positive")
        per_ip = max_failures if max_failures_per_ip is None else max_failures_per_ip
        if per_ip < max_failures:
            raise ValueError(f"max_failures_per_ip {per_ip} must be at least max_failures ({max_failures})")
        self.max_failures = max_failures
        self.max_failures_per_ip = per_ip
        self.window_s = window_s
        self._fails: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _keys(self, ip: str, username: str) -> tuple[tuple[str, int], tuple[str, int]]:
        return (f"ip:{ip}", self.max_failures_per_ip), (f"user:{username.lower()}", self.max_failures)

    def _prune(self, key: str, now: float) -> deque[float]:
        """The key's failures within the window; keys with none are dropped, so that attempts
        with many made-up usernames do not grow the table."""
        q = self._fails.get(key)
        if q is None:
            return deque()
        while q and now - q[0] > self.window_s:
            q.popleft()
        if not q:
            del self._fails[key]
        return q

    def retry_after(self, ip: str, username: str) -> float:
        """Seconds until this account may be tried from this IP again; 0 when allowed now."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key, limit in self._keys(ip, username):
                q = self._prune(key, now)
                if len(q) >= limit:
                    # The oldest failures that keep the count at the limit must age out first.
                    wait = max(wait, self.window_s - (now - q[len(q) - limit]))
        return wait

    def failed(self, ip: str, username: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key, _limit in self._keys(ip, username):
                self._prune(key, now)
                self._fails[key].append(now)

    def succeeded(self, username: str) -> None:
        """A correct password clears its account's failures (not the IP's: a valid login must not
        reset the counter that stops guessing other accounts from the same address)."""
        with self._lock:
            self._fails.pop(f"user:{username.lower()}", None)


# --------------------------------------------------------------------------- session secret


def session_secret(settings: Settings) -> str:
    """``secret_key`` when set, else a random key kept in data_dir/secret_key (mode 0600)."""
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.data_dir) / "secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: when several processes start at once, the first one's key wins
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    for _ in range(50):  # another process may be between create and write
        key = path.read_text().strip()
        if key:
            return key
        time.sleep(0.02)
    raise RuntimeError(f"{path} is empty; delete it or set SYNTHPERF_SECRET_KEY")
