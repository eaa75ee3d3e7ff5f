"""`mirror pins [--json]`: the images pinned on a running node, with the bytes they hold."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mirror.admin.client import AdminClient, add_server_arguments
from mirror.commands.store import human


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
    width = max(len(p["pin"]) for p in pins)
    print(f"{'PIN':<{width}}  {'OBJECTS':>7}  {'SIZE':>10}  {'ONLY IT':>10}  PINNED")
    for pin in pins:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(pin["created"]))
        print(f"{pin['pin']:<{width}}  {pin['objects']:>7}  {human(pin['bytes']):>10}  "
              f"{human(pin['exclusive_bytes']):>10}  {when}")
    return 0
