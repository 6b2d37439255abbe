#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    from config.telemetry import telemetry_setup_for_command

    # Traces of the long-running workers (rqworker) when OTEL_* asks; off by default.
    telemetry_setup_for_command(sys.argv)

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
