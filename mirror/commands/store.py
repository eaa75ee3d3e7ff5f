"""Store tools: `mirror verify`, `mirror gc`, `mirror purge`, `mirror du`, `mirror stats`.

All but `verify --offline` act on a running node through its admin API, so
its in-memory state (access times, in-flight fetches, open readers) is
respected; `verify --offline CONFIG` (or `--store DIR`) re-hashes a store no
node is serving. Each takes the node's config file first, as `registry
garbage-collect CONFIG` does: the admin address, token and store come from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mirror.admin.client import AdminClient, add_server_arguments, split_config, store_root
from mirror.storage.verify import DEFAULT_WORKERS, NotAStore, verify_offline


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verify = subparsers.add_parser(
        "verify", help="re-hash the store; quarantine objects whose bytes do not match their digest")
    add_server_arguments(verify)
    verify.add_argument("--offline", action="store_true",
                        help="verify CONFIG's store directly (when no node is serving it)")
    verify.add_argument("--store", type=Path, metavar="DIR",
                        help="verify this store directory offline (when no node is serving it)")
    verify.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="hashing threads (default 4)")
    verify.add_argument("--json", action="store_true", help="print the raw JSON result")
    verify.set_defaults(func=run_verify)

    gc = subparsers.add_parser("gc", help="evict least-recently-used objects now")
    add_server_arguments(gc)
    gc.add_argument("--target", metavar="SIZE",
                    help='evict down to this size ("50GiB", bytes); default: the low watermark')
    gc.add_argument("--json", action="store_true", help="print the raw JSON result")
    gc.set_defaults(func=run_gc)

    purge = subparsers.add_parser(
        "purge", help="take content down: REPO (tags, links, unshared blobs), REPO:TAG or REPO@DIGEST",
        usage="mirror purge [-h] [--server SERVER] [--token TOKEN] [--json] [CONFIG] REPO[:TAG|@DIGEST]")
    add_server_arguments(purge, config_positional=False)
    purge.add_argument("reference", nargs="+", metavar="ARG",
                       help="the node's config.yml (optional), then REPO, REPO:TAG or REPO@DIGEST")
    purge.add_argument("--json", action="store_true", help="print the raw JSON result")
    purge.set_defaults(func=run_purge)

    du = subparsers.add_parser("du", help="store size and object counts, per repository")
    add_server_arguments(du)
    du.add_argument("--json", action="store_true", help="print the raw JSON result")
    du.set_defaults(func=run_du)

    stats = subparsers.add_parser("stats", help="store size, quota, disk, cache hit ratio, evictions")
    add_server_arguments(stats)
    stats.add_argument("--json", action="store_true", help="print the raw JSON result")
    stats.set_defaults(func=run_stats)


def human(size: int | None) -> str:
    """1536 -> "1.5 KiB"."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _print_json(result: Any) -> None:
    print(json.dumps(result, indent=2, sort_keys=True))


def run_verify(args: argparse.Namespace) -> int:
    if args.store is not None or args.offline:
        root = args.store or store_root(args)
        if root is None:
            print("mirror verify: --offline needs the node's CONFIG (or --store DIR)", file=sys.stderr)
            return 2
        try:
            result = verify_offline(root, max(1, args.workers)).as_dict()
        except NotAStore as exc:
            print(f"mirror: {exc}", file=sys.stderr)
            return 2
    else:
        client = AdminClient.from_args(args, timeout=None)
        result = client.call("POST", "/admin/verify", params={"workers": max(1, args.workers)})
    if args.json:
        _print_json(result)
        return 0
    print(f"checked {result['checked']} objects ({human(result['bytes'])}): {result['ok']} ok, "
          f"{result['corrupt']} corrupt (quarantined), {result['missing']} gone meanwhile")
    for digest in result["quarantined"]:
        print(f"quarantined {digest}")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    body = {} if args.target is None else {"target": int(args.target) if args.target.isdigit() else args.target}
    result = AdminClient.from_args(args, timeout=None).call("POST", "/admin/gc", json=body)
    if args.json:
        _print_json(result)
        return 0
    print(f"evicted {result['evicted']} objects ({human(result['bytes'])}); {human(result['used'])} used")
    return 0


def run_purge(args: argparse.Namespace) -> int:
    args.config, rest = split_config(args.reference)
    if len(rest) != 1:
        print("mirror purge: expected [CONFIG] REPO[:TAG|@DIGEST]", file=sys.stderr)
        return 2
    args.reference = rest[0]
    result = AdminClient.from_args(args, timeout=None).call(
        "POST", "/admin/purge", json={"reference": args.reference})
    if args.json:
        _print_json(result)
        return 0
    print(f"purged {args.reference}: {result['tags']} tags and {result['links']} links forgotten, "
          f"{result['objects']} objects ({human(result['bytes'])}) deleted")
    return 0


def run_du(args: argparse.Namespace) -> int:
    result = AdminClient.from_args(args).call("GET", "/admin/du")
    if args.json:
        _print_json(result)
        return 0
    print(f"objects      {result['objects']}")
    print(f"size         {human(result['bytes'])} ({result['bytes']} bytes)")
    print(f"pinned       {result['pinned_objects']} objects, {human(result['pinned_bytes'])}")
    print(f"quarantined  {result['quarantined_objects']} objects")
    repositories = result["repositories"]
    if repositories:
        width = max(10, *(len(r["repository"]) for r in repositories))
        print()
        print(f"{'REPOSITORY':<{width}}  {'OBJECTS':>8}  {'SIZE':>10}  {'TAGS':>5}")
        for repo in repositories:
            print(f"{repo['repository']:<{width}}  {repo['objects']:>8}  {human(repo['bytes']):>10}  "
                  f"{repo['tags']:>5}")
    return 0


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _outcomes(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items())) or "no requests yet"


def run_stats(args: argparse.Namespace) -> int:
    result = AdminClient.from_args(args).call("GET", "/admin/stats")
    if args.json:
        _print_json(result)
        return 0
    store, quota, disk, cache = result["store"], result["quota"], result["disk"], result["cache"]
    print(f"store        {store['objects']} objects, {human(store['bytes'])} "
          f"(pinned: {store['pinned_objects']} objects, {human(store['pinned_bytes'])}; "
          f"quarantined: {store['quarantined_objects']})")
    if quota["max_size"] is None:
        print(f"quota        none (unbounded); used {human(quota['used'])}, reserved {human(quota['reserved'])}")
    else:
        print(f"quota        max {human(quota['max_size'])}, high {human(quota['high_watermark'])}, "
              f"low {human(quota['low_watermark'])}; used {human(quota['used'])}, "
              f"reserved {human(quota['reserved'])}")
    print(f"disk         {human(disk['free'])} free of {human(disk['total'])}")
    print(f"hit ratio    {_ratio(cache['hit_ratio'])} ({_outcomes(cache['outcomes'])})")
    for kind, figures in cache["by_kind"].items():
        print(f"  {kind:<10} {_ratio(figures['hit_ratio'])} ({_outcomes(figures['outcomes'])})")
    print(f"evictions    {result['evictions']['objects']} objects, {human(result['evictions']['bytes'])}")
    print(f"in flight    {result['inflight']} fetches")
    return 0
