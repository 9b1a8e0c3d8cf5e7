"""Settings of the Django OAuth Toolkit server that tests/interop/django.rs runs bearerd against.

A throwaway server for tests: one process, loopback only, DEBUG off, and a SQLite database
in the directory named by BEARERD_INTEROP_DB_DIR (a temporary directory the test makes; the
database never lives in the repository).
"""

import os
import secrets
from pathlib import Path

try:
    DB_DIR = Path(os.environ["BEARERD_INTEROP_DB_DIR"])
except KeyError:
    raise SystemExit(
        "BEARERD_INTEROP_DB_DIR is not set: name a temporary directory for the SQLite database"
    ) from None

DEBUG = False
# A fresh key per process: nothing signed by this server outlives it.
SECRET_KEY = secrets.token_urlsafe(50)
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "dotserver.urls"
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "oauth2_provider",
    "dotserver",
]

# As in a project made by `django-admin startproject`, less what needs sessions: with
# CommonMiddleware (APPEND_SLASH), a POST to /o/token (no trailing slash) is answered 301.
MIDDLEWARE = [
    "dotserver.middleware.count_token_requests",
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DB_DIR / "oauth.sqlite3",
        # The WSGI server answers on several threads: wait for SQLite's lock rather than
        # fail. No fsync: the database is thrown away with the server.
        "OPTIONS": {"timeout": 20, "init_command": "PRAGMA synchronous=OFF;"},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Tables are made straight from the models (migrate --run-syncdb): a fresh throwaway database
# has no history to migrate, and this takes 0.1 s where running the migrations takes 2.5 s,
# at every server start.
MIGRATION_MODULES = {app.rsplit(".", 1)[-1]: None for app in INSTALLED_APPS}

OAUTH2_PROVIDER = {
    # The scopes a client may ask for; a token request without `scope` gets all of them.
    "SCOPES": {"read": "Read", "write": "Write"},
    # DOT's default is 36000 s (10 h); bearerd would refresh such a token after 7-8 h.
    "ACCESS_TOKEN_EXPIRE_SECONDS": 3600,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {
        # One line per rejected request ("Unauthorized: /o/token/").
        "django.request": {"handlers": ["stderr"], "level": "WARNING"},
        "oauth2_provider": {"handlers": ["stderr"], "level": os.environ.get("DOT_LOG_LEVEL", "INFO")},
    },
}
