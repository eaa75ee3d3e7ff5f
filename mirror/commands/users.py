"""`mirror users [--forget NAME]`: the users a running node can serve offline."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from urllib.parse import quote

from mirror.admin.client import AdminClient, add_server_arguments


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("users",
                                   help="list (or forget) the users learned for offline tokens")
    parser.add_argument("--forget", metavar="NAME",
                        help="forget this user's credentials and grants")
    parser.add_argument("--json", action="store_true", help="print the admin API's JSON")
    add_server_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    client = AdminClient.from_args(args)
    if args.forget:
        client.call("DELETE", f"/admin/users/{quote(args.forget, safe='')}")
        print(f"forgot {args.forget}: no offline tokens for them until they log in online again")
        return 0
    result = client.call("GET", "/admin/users")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if not result["users"]:
        print("no users learned yet")
        return 0
    width = max(len(u["name"]) for u in result["users"])
    print(f"{'USER':<{width}}  {'LEARNED':<19}  CREDS  REPOSITORIES")
    for user in result["users"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(user["learned_at"]))
        repositories = " ".join(user["repositories"])
        print(f"{user['name']:<{width}}  {when}  {user['credentials']:>5}  {repositories}")
    return 0
