"""`mirror top [-n N]`: the most pulled `repository:tag` of a running node."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mirror.admin.client import AdminClient, add_server_arguments


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("top", help="the most pulled tags of a running node")
    parser.add_argument("-n", type=int, default=20, help="how many (default 20)")
    parser.add_argument("--json", action="store_true", help="print the admin API's JSON")
    add_server_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = AdminClient.from_args(args).call("GET", "/admin/top", params={"n": max(args.n, 0)})
    entries = result["top"]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print("no pulls counted yet")
        return 0
    width = max(len(f"{e['repository']}:{e['tag']}") for e in entries)
    print(f"{'PULLS':>8}  {'IMAGE':<{width}}  LAST PULL")
    for entry in entries:
        image = f"{entry['repository']}:{entry['tag']}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["last_pull"]))
        print(f"{entry['pulls']:>8}  {image:<{width}}  {when}")
    return 0
