#!/usr/bin/env python
"""Django's command-line utility for the interop server, e.g.

    BEARERD_INTEROP_DB_DIR=$(mktemp -d) python manage.py interop_setup --help
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dotserver.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
