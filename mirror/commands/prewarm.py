"""`mirror prewarm IMAGE... | -f list.txt [--platform P] [--pin]` and `mirror unpin IMAGE...`.

Prewarm starts a job on the running node (its admin API), follows it with
progress bars with rate and ETA on stderr (a terminal; coloured unless
NO_COLOR) or a line now and then (not a terminal), and prints a summary; the exit status is 1 when any image failed.
`--no-wait` prints the job id and returns at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from typing import Any, TextIO

from mirror.admin.client import AdminClient, add_server_arguments, split_config
from mirror.commands.table import colour_wanted, paint

POLL = 0.5
BAR = 30
QUIET_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal
RATE_WINDOW = 5.0  # seconds of polls the shown rate is measured over


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("prewarm", help="fetch images into a running node's cache")
    parser.add_argument("images", nargs="*", metavar="[CONFIG] IMAGE",
                        help="the node's config.yml (optional), then repo:tag or repo@digest")
    parser.add_argument("-f", "--file", action="append", default=[],
                        help="a file of images, one a line (# comments); - for stdin")
    parser.add_argument("--platform", default=None,
                        help="os/arch[/variant], a comma list, or all (default linux/amd64)")
    parser.add_argument("--pin", action="store_true", help="exempt the images from eviction")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    add_server_arguments(parser, config_positional=False)
    parser.set_defaults(func=run)

    unpin = subparsers.add_parser("unpin", help="let pinned images be evicted again")
    unpin.add_argument("images", nargs="+", metavar="[CONFIG] IMAGE")
    add_server_arguments(unpin, config_positional=False)
    unpin.set_defaults(func=run_unpin)


def read_images(args: argparse.Namespace) -> list[str]:
    args.config, images = split_config(list(args.images))
    for name in args.file:
        handle = sys.stdin if name == "-" else open(name, encoding="utf-8")  # noqa: SIM115
        with handle:
            for line in handle:
                line = line.split("#", 1)[0].strip()
                if line:
                    images.append(line)
    return images


def run(args: argparse.Namespace) -> int:
    try:
        images = read_images(args)
    except OSError as exc:
        sys.exit(f"mirror: {exc}")
    if not images:
        sys.exit("mirror prewarm: no images given (IMAGE... or -f FILE)")
    client = AdminClient.from_args(args)
    body: dict[str, Any] = {"images": images, "pin": args.pin}
    if args.platform:
        body["platform"] = args.platform
    job = client.call("POST", "/admin/prewarm", json=body)
    if args.no_wait:
        print(job["id"])
        return 0
    started = time.monotonic()
    progress = Progress(sys.stderr)
    while job["state"] in ("queued", "running"):
        progress.show(job)
        time.sleep(POLL)
        job = client.call("GET", f"/admin/jobs/{job['id']}")
    progress.show(job, final=True)
    print(summary(job, time.monotonic() - started))
    for error in job["errors"]:
        where = f" {error['digest']}" if error.get("digest") else ""
        print(f"  error: {error['image']}{where}: {error['error']}")
    return 0 if job["state"] == "done" else 1


def run_unpin(args: argparse.Namespace) -> int:
    args.config, images = split_config(list(args.images))
    if not images:
        sys.exit("mirror unpin: no images given ([CONFIG] IMAGE...)")
    result = AdminClient.from_args(args).call("POST", "/admin/unpin", json={"images": images})
    for entry in result["pins"]:
        print(f"unpinned {entry['pin']}: {len(entry['released'])} objects released"
              + (f", {len(entry['kept'])} still pinned by other images" if entry["kept"] else ""))
    for text in result["unknown"]:
        print(f"  not pinned: {text}")
    return 0


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def bar(done: int, total: int, width: int = BAR) -> str:
    filled = width if total <= 0 else min(width, width * done // total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Progress:
    """Two bars (blobs, bytes, with rate and ETA) redrawn in place on a terminal; lines otherwise.

    The rate is measured over the last RATE_WINDOW seconds of polls, so it
    follows the link rather than the job's average; colour only on a terminal.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.colour = colour_wanted(stream)
        self.last = 0.0
        self.drawn = False
        self.samples: deque[tuple[float, int]] = deque()

    def rate(self, done: int, now: float) -> float | None:
        """Bytes per second over the recent window (None until two samples)."""
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def show(self, job: dict[str, Any], final: bool = False) -> None:
        now = time.monotonic()
        rate = self.rate(job["bytes_done"], now)
        speed = ""
        if rate is not None and not final:
            left = max(0, job["bytes_total"] - job["bytes_done"])
            speed = f"  {human(rate)}/s" + (f"  ETA {clock(left / rate)}" if rate > 0 else "")
        style = "red" if job["state"] == "failed" else "green" if job["state"] == "done" else None
        blobs = (f"{paint(bar(job['blobs_done'], job['blobs_total']), style, self.colour)} "
                 f"{job['blobs_done']}/{job['blobs_total']} blobs")
        size = (f"{paint(bar(job['bytes_done'], job['bytes_total']), style, self.colour)} "
                f"{human(job['bytes_done'])}/{human(job['bytes_total'])}{speed}")
        if self.tty:
            if self.drawn:
                self.stream.write("\x1b[2F")
            self.stream.write(f"\x1b[2K{blobs}\n\x1b[2K{size}\n")
            self.drawn = True
        elif final or now - self.last >= QUIET_EVERY:
            self.last = now
            self.stream.write(f"{job['state']}: {job['blobs_done']}/{job['blobs_total']} blobs, "
                              f"{human(job['bytes_done'])}/{human(job['bytes_total'])}{speed}\n")
        self.stream.flush()


def clock(seconds: float) -> str:
    """95 -> "1:35"; 3725 -> "1:02:05"."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def summary(job: dict[str, Any], seconds: float) -> str:
    images = len(job["images"])
    failed = {e["image"] for e in job["errors"]}
    fetched = job["blobs_done"] - job["blobs_cached"]
    return (f"prewarm {job['state']}: {images - len(failed)}/{images} images, "
            f"{job['manifests']} manifests, {job['blobs_done']} blobs ({fetched} fetched, "
            f"{job['blobs_cached']} already cached), {human(job['bytes_fetched'])} fetched "
            f"in {seconds:.1f}s" + (", pinned" if job["pin"] and not job["errors"] else "")
            + (f"; {len(job['errors'])} errors" if job["errors"] else ""))
