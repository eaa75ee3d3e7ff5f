"""`mirror pins [--json]`: the images pinned on a running node, with the bytes they hold."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mirror.admin.client import AdminClient, add_server_arguments
from mirror.commands.store import human
from mirror.commands.table import colour_wanted, table


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("pins", help="the images pinned on a running node")
    parser.add_argument("--json", action="store_true", help="print the admin API's JSON")
    add_server_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pins = AdminClient.from_args(args).call("GET", "/admin/pins")["pins"]
    if args.json:
        print(json.dumps(pins, indent=2))
        return 0
    if not pins:
        print("no pins")
        return 0
    rows = [[pin["pin"], str(pin["objects"]), human(pin["bytes"]), human(pin["exclusive_bytes"]),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(pin["created"]))] for pin in pins]
    print(table(["PIN", "OBJECTS", "SIZE", "EXCLUSIVE", "PINNED"], rows, right=(1, 2, 3),
                colour=colour_wanted()))
    return 0
