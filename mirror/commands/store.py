"""Store tools: `mirror verify`, `quarantine`, `gc`, `purge`, `du`, `stats`.

All but `verify --offline` and `quarantine --store DIR` act on a running
node through its admin API, so its in-memory state (access times, in-flight
fetches, open readers) is respected; `verify --offline CONFIG` (or `--store
DIR`) re-hashes a store no node is serving. Each takes the node's config file
first, as `registry garbage-collect CONFIG` does: the admin address, token
and store come from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mirror.admin.client import AdminClient, add_server_arguments, split_config, store_root
from mirror.commands.table import colour_wanted, ratio_style, table
from mirror.storage import quarantine
from mirror.storage.blobstore import path_for
from mirror.storage.verify import DEFAULT_WORKERS, NotAStore, verify_offline

#: `mirror verify` found objects whose bytes do not match their digest (quarantined),
#: so cron and monitoring see it; 1 and 2 stay "could not verify" (node, store).
EXIT_CORRUPT = 3


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

    quarantined = subparsers.add_parser(
        "quarantine", help="list the objects verify set aside (--empty deletes them)")
    add_server_arguments(quarantined)
    quarantined.add_argument("--store", type=Path, metavar="DIR",
                             help="act on this store directory offline (when no node is serving it)")
    quarantined.add_argument("--empty", action="store_true", help="delete every quarantined object")
    quarantined.add_argument("--json", action="store_true", help="print the raw JSON result")
    quarantined.set_defaults(func=run_quarantine)

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
    code = EXIT_CORRUPT if result["corrupt"] else 0
    if args.json:
        _print_json(result)
        return code
    print(f"checked {result['checked']} objects ({human(result['bytes'])}): {result['ok']} ok, "
          f"{result['corrupt']} corrupt (quarantined), {result['missing']} gone meanwhile")
    for digest in result["quarantined"]:
        print(f"quarantined {digest}")
    return code


def run_quarantine(args: argparse.Namespace) -> int:
    if args.store is not None:
        if not path_for(args.store, "layout").is_file():
            print(f"mirror: {args.store}: not a mirror store (no {path_for(args.store, 'layout').name})",
                  file=sys.stderr)
            return 2
        if args.empty:
            removed, size = quarantine.empty_quarantine(args.store)
            result: dict[str, Any] = {"removed": removed, "bytes": size}
        else:
            result = quarantine.report(args.store)
    else:
        client = AdminClient.from_args(args)
        result = client.call("DELETE" if args.empty else "GET", "/admin/quarantine")
    if args.json:
        _print_json(result)
    elif args.empty:
        print(f"removed {result['removed']} quarantined objects ({human(result['bytes'])})")
    else:
        _print_quarantine(result)
    return 0


def _print_quarantine(result: dict[str, Any]) -> None:
    if not result["objects"]:
        print("quarantine is empty")
        return
    print(f"{'QUARANTINED':<19}  {'SIZE':>10}  OBJECT")
    for item in result["objects"]:
        when = item["quarantined_at"]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "-"
        print(f"{stamp:<19}  {human(item['size']):>10}  {item['digest'] or item['name']}")
    print(f"{result['count']} objects, {human(result['bytes'])}; `mirror quarantine --empty` deletes them")


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
    print(format_du(result, colour_wanted()))
    return 0


def format_du(result: dict[str, Any], colour: bool = False) -> str:
    """Totals, then one aligned row per repository (largest first)."""
    summary = table((), [
        ["objects", str(result["objects"])],
        ["size", f"{human(result['bytes'])} ({result['bytes']} bytes)"],
        ["pinned", f"{result['pinned_objects']} objects, {human(result['pinned_bytes'])}"],
        ["quarantined", f"{result['quarantined_objects']} objects"],
    ], styles=[["bold"]] * 4, colour=colour)
    repositories = result["repositories"]
    if not repositories:
        return summary
    rows = [[r["repository"], str(r["objects"]), human(r["bytes"]), str(r["tags"])] for r in repositories]
    return summary + "\n\n" + table(["REPOSITORY", "OBJECTS", "SIZE", "TAGS"], rows, right=(1, 2, 3),
                                     colour=colour)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


#: Cache outcomes in the order a reader thinks of them: served locally first.
OUTCOMES = ("hit", "revalidated", "stale", "coalesced", "miss")


def run_stats(args: argparse.Namespace) -> int:
    result = AdminClient.from_args(args).call("GET", "/admin/stats")
    if args.json:
        _print_json(result)
        return 0
    print(format_stats(result, colour_wanted()))
    return 0


def format_stats(result: dict[str, Any], colour: bool = False) -> str:
    """Store, quota, disk, evictions and link as aligned lines, then the cache outcomes as a table."""
    store, quota, disk = result["store"], result["quota"], result["disk"]
    if quota["max_size"] is None:
        limits = f"none (unbounded); used {human(quota['used'])}, reserved {human(quota['reserved'])}"
    else:
        limits = (f"max {human(quota['max_size'])}, high {human(quota['high_watermark'])}, "
                  f"low {human(quota['low_watermark'])}; used {human(quota['used'])}, "
                  f"reserved {human(quota['reserved'])}")
    lines = [
        ["store", f"{store['objects']} objects, {human(store['bytes'])} (pinned: {store['pinned_objects']} "
                  f"objects, {human(store['pinned_bytes'])}; quarantined: {store['quarantined_objects']})"],
        ["quota", limits],
        ["disk", f"{human(disk['free'])} free of {human(disk['total'])}"],
        ["evictions", f"{result['evictions']['objects']} objects, {human(result['evictions']['bytes'])}"],
    ]
    if "link" in result:
        lines.append(["link", f"{human(result['link']['saved'])} served from the store, "
                              f"{human(result['link']['fetched'])} fetched from upstream"])
    lines.append(["in flight", f"{result['inflight']} fetches"])
    if not result["cache"]["outcomes"]:
        lines.append(["cache", "no requests yet"])
    text = table((), lines, styles=[["bold"]] * len(lines), colour=colour)
    if not result["cache"]["outcomes"]:
        return text
    return text + "\n\n" + _cache_table(result["cache"], colour)


def _cache_table(cache: dict[str, Any], colour: bool) -> str:
    """One row per kind and one for all: requests, hit ratio, then a column per outcome."""
    seen = [o for o in OUTCOMES if any(o in k["outcomes"] for k in cache["by_kind"].values())]
    seen += sorted({o for k in cache["by_kind"].values() for o in k["outcomes"]} - set(seen))
    figures = [("all", cache), *sorted(cache["by_kind"].items())]
    rows = [[name, str(sum(f["outcomes"].values())), _ratio(f["hit_ratio"]),
             *(str(f["outcomes"].get(o, 0)) for o in seen)] for name, f in figures]
    styles = [[None, None, ratio_style(f["hit_ratio"])] for _, f in figures]
    headers = ["CACHE", "REQUESTS", "HIT RATIO", *(o.upper() for o in seen)]
    return table(headers, rows, right=range(1, len(headers)), styles=styles, colour=colour)
