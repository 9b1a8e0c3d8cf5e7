#!/usr/bin/env python
"""Runs the Django OAuth Toolkit server for tests/interop/django.rs.

Sets up the database (the interop_setup command: migrate, then the two applications, whose
ids and secrets come from the environment), binds 127.0.0.1 on the port given as the first
argument (default 0: one the kernel picks), prints

    listening on 127.0.0.1:PORT

on stdout once it accepts connections, and serves with waitress until it is killed or its
standard input closes (the test that started it is gone).

    BEARERD_INTEROP_DB_DIR=$(mktemp -d) BEARERD_INTEROP_CLIENT_ID=bearerd \\
    BEARERD_INTEROP_CLIENT_SECRET=s3cret BEARERD_INTEROP_RS_CLIENT_ID=rs \\
    BEARERD_INTEROP_RS_CLIENT_SECRET=rs-s3cret python serve.py 8000
"""

import os
import sys
import threading
from pathlib import Path


def exit_when_stdin_closes():
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dotserver.settings")

    import django
    from django.core.management import call_command
    from django.core.wsgi import get_wsgi_application
    from waitress.server import create_server

    django.setup()
    call_command("interop_setup")
    app = get_wsgi_application()
    server = create_server(app, host="127.0.0.1", port=port, threads=4, ident="dot-interop")
    print(f"listening on 127.0.0.1:{server.effective_port}", flush=True)
    if not sys.stdin.isatty():
        threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
