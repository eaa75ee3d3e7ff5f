"""`mirror top [-n N]`: the most pulled `repository:tag` of a running node."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mirror.admin.client import AdminClient, add_server_arguments
from mirror.commands.table import colour_wanted, table


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
    print(format_top(entries, colour_wanted()))
    return 0


def format_top(entries: list[dict[str, Any]], colour: bool = False) -> str:
    """PULLS, IMAGE, REGISTRY, LAST PULL, aligned; most pulled first as the node ranked them."""
    rows = [[str(e["pulls"]), f"{e['repository']}:{e['tag']}", e.get("registry", ""),
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["last_pull"]))] for e in entries]
    return table(["PULLS", "IMAGE", "REGISTRY", "LAST PULL"], rows, right=(0,), colour=colour)
