"""`estat-dlq`: the operator's tool for the dead-letter directory.

    estat-dlq [--env-file FILE] [--dlq-dir DIR] [store options] COMMAND

`list`, `show ID`, `replay [ID...|--all]`, `purge ID...|--older-than D`,
`verify`. Settings come from the same environment variables as the server
(or `--env-file`, e.g. the server's EnvironmentFile), so `replay` uploads
with the server's store, keys and credentials. `replay` and `purge` lock
each entry first, so they are safe while the server's drain runs.

Exit codes: 0 done, 1 something failed (each failure is one line on
stderr), 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, NoReturn, Optional, Sequence

from estat.codec import GZIP_WBITS
from estat.config import OPTIONS, ConfigError, Settings, load_settings
from estat.dlq import disk as dlqdisk

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# The server options that matter here: where the DLQ is and how to store.
_CLI_OPTIONS = [o for o in OPTIONS
                if o.name in ("dlq-dir", "output-dir") or o.name.startswith("s3-")]


class Failed(Exception):
    """The command cannot go on; the message is one sentence for stderr."""


class Reporter:
    """Where output goes, and whether anything failed."""

    def __init__(self, out: Any, err: Any) -> None:
        self.out, self.err = out, err
        self.failures = 0

    def say(self, text: str) -> None:
        print(text, file=self.out)

    def note(self, text: str) -> None:
        print(text, file=self.err)

    def fail(self, text: str) -> None:
        self.failures += 1
        print(f"estat-dlq: {text}", file=self.err)

    def code(self) -> int:
        return EXIT_FAILED if self.failures else EXIT_OK


# -- small helpers ------------------------------------------------------------

def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `12h`, `7d`, `2w` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration such as 90s, 30m, 12h or 7d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * unit


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for size, unit, sub_size, sub_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"),
                                           (60, "m", 1, "s")):
        if seconds >= size:
            return f"{seconds // size}{unit}{(seconds % size) // sub_size:02d}{sub_unit}"
    return f"{seconds}s"


def format_ms(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) + f" ({ms})"


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= or `set -a; . FILE`
    read them: comments and blank lines skipped, one level of quotes off."""
    values = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise Failed(f"cannot read --env-file {path}: {error.strerror}.") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        name, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
            raise Failed(f"{path}:{number} is not a KEY=VALUE line.")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def last_error(meta: Mapping[str, Any]) -> str:
    error = meta.get("last_error")
    if not isinstance(error, dict):
        return "-"
    text = f"{error.get('code', '?')}: {error.get('message', '')}"
    return " ".join(text.split())[:100]


class DeadLetterDir:
    """The dead-letter directory as the CLI sees it: its entries by name,
    resolved from the IDs an operator types."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def check(self) -> None:
        if not os.path.isdir(self.root):
            raise Failed(f"the dead-letter directory {self.root} does not exist "
                         "(check --dlq-dir or DLQ_DIR).")

    def names(self) -> list[str]:
        return dlqdisk.entry_names(self.root)

    def resolve(self, ids: Iterable[str]) -> list[str]:
        """Entry names from IDs as `list` prints them, or unique prefixes."""
        names = self.names()
        resolved = []
        for given in ids:
            wanted = os.path.basename(given.rstrip("/"))
            matches = [n for n in names if n == wanted] or [
                n for n in names if n.startswith(wanted)]
            if not wanted or not matches:
                raise Failed(f"no dead-letter entry {given!r} in {self.root} "
                             "(see `estat-dlq list`).")
            if len(matches) > 1:
                raise Failed(f"{given!r} matches {len(matches)} entries; give more of "
                             "the ID.")
            if matches[0] not in resolved:
                resolved.append(matches[0])
        return resolved

    def quarantined(self) -> int:
        try:
            return len(os.listdir(os.path.join(self.root, dlqdisk.QUARANTINE)))
        except FileNotFoundError:
            return 0


def first_lines(data: bytes, count: int) -> list[str]:
    inflater = zlib.decompressobj(GZIP_WBITS)
    text = inflater.decompress(data, 64 * 1024 + count * 16 * 1024)
    return [line.decode("utf-8", "replace") for line in text.splitlines()[:count]]


# -- commands -----------------------------------------------------------------

def cmd_list(dlq: DeadLetterDir, args: argparse.Namespace, report: Reporter) -> None:
    names = dlq.names()
    now = time.time()
    total_events = total_bytes = 0
    report.say(f"{'ID':<54} {'AGE':>7} {'EVENTS':>7} {'BYTES':>10} {'ATTEMPTS':>8}  "
               "LAST ERROR")
    for name in names:
        try:
            meta = dlqdisk.read_meta(dlq.root, name)
        except (dlqdisk.EntryError, OSError) as error:
            report.say(f"{name:<54} {'-':>7} {'-':>7} {'-':>10} {'-':>8}  "
                       f"UNREADABLE: {error}")
            continue
        total_events += meta["event_count"]
        total_bytes += meta["compressed_bytes"]
        report.say(f"{name:<54} {format_age(now - meta['created_at_ms'] / 1000):>7} "
                   f"{meta['event_count']:>7} {meta['compressed_bytes']:>10} "
                   f"{meta['attempts']:>8}  {last_error(meta)}")
    summary = f"{len(names)} entries, {total_events} events, {total_bytes} bytes in {dlq.root}"
    quarantined = dlq.quarantined()
    if quarantined:
        summary += f"; {quarantined} in quarantine/"
    report.note(summary)


def cmd_show(dlq: DeadLetterDir, args: argparse.Namespace, report: Reporter) -> None:
    [name] = dlq.resolve([args.id])
    meta = dlqdisk.read_meta(dlq.root, name)
    report.say(f"entry: {os.path.join(dlq.root, name)}")
    report.say(json.dumps(meta, indent=2, sort_keys=True))
    for field in ("created_at_ms", "first_ts_ms", "last_ts_ms"):
        report.say(f"{field[:-3]}: {format_ms(meta[field])}")
    entry = dlqdisk.read_entry(dlq.root, name)
    lines = first_lines(entry.data, args.lines)
    report.say(f"--- first {len(lines)} of {meta['event_count']} lines of data.gz ---")
    for line in lines:
        report.say(line)


def cmd_verify(dlq: DeadLetterDir, args: argparse.Namespace, report: Reporter) -> None:
    names = dlq.names()
    for name in names:
        try:
            entry = dlqdisk.read_entry(dlq.root, name)
            lines = zlib.decompress(entry.data, GZIP_WBITS).splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    json.loads(line)
                except ValueError:
                    raise dlqdisk.EntryError(f"line {number} is not JSON") from None
            if len(lines) != entry.meta["event_count"]:
                raise dlqdisk.EntryError(f"{len(lines)} lines, meta.json says "
                                         f"{entry.meta['event_count']} events")
        except (dlqdisk.EntryError, OSError) as error:
            report.fail(f"BAD {name}: {error}")
            continue
        report.say(f"ok  {name} ({len(lines)} events)")
    report.note(f"{len(names)} entries checked, {report.failures} bad")


def _targets(dlq: DeadLetterDir, args: argparse.Namespace, report: Reporter) -> list[str]:
    if getattr(args, "all", False):
        return dlq.names()
    if getattr(args, "older_than", None) is not None:
        cutoff_ms = (time.time() - args.older_than) * 1000
        old = []
        for name in dlq.names():
            try:
                if dlqdisk.read_meta(dlq.root, name)["created_at_ms"] < cutoff_ms:
                    old.append(name)
            except (dlqdisk.EntryError, OSError) as error:
                report.note(f"skipped {name}: cannot read its age ({error})")
        return old
    return dlq.resolve(args.ids)


def cmd_purge(dlq: DeadLetterDir, args: argparse.Namespace, report: Reporter) -> None:
    names = _targets(dlq, args, report)
    events = 0
    for name in names:
        try:
            fd = dlqdisk.lock_entry(dlq.root, name)
        except dlqdisk.Busy:
            report.fail(f"{name} is being uploaded by another process (the server's "
                        "drain?); try again in a moment.")
            continue
        except FileNotFoundError:
            report.note(f"{name} is already gone (re-uploaded or purged meanwhile)")
            continue
        try:
            count = dlqdisk.read_meta(dlq.root, name)["event_count"]
        except (dlqdisk.EntryError, OSError):
            count = 0
        try:
            dlqdisk.remove_locked(dlq.root, name, fd)
        except OSError as error:
            report.fail(f"cannot delete {name}: {error.strerror}.")
            continue
        events += count
        report.say(f"purged {name} ({count} events)")
    report.note(f"purged {len(names) - report.failures} entries, {events} events")


def cmd_replay(dlq: DeadLetterDir, args: argparse.Namespace, report: Reporter,
               settings: Settings) -> None:
    names = _targets(dlq, args, report)
    if not names:
        report.note("nothing to replay")
        return
    from twisted.internet.task import react

    def main(reactor: Any) -> Any:
        from estat.dlq.replay import replay_all

        d = replay_all(reactor, settings, dlq.root, names, report,
                       explicit=not args.all)

        def done(_: object) -> None:
            raise SystemExit(report.code())

        return d.addCallback(done)

    react(main)


# -- parsing --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--env-file", default=argparse.SUPPRESS, metavar="FILE",
                        help="read settings from KEY=VALUE lines, e.g. the server's "
                             "EnvironmentFile; they beat the environment, options "
                             "beat both")
    for option in _CLI_OPTIONS:
        common.add_argument(f"--{option.name}", default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"{option.help} [env {option.env}]")
    parser = argparse.ArgumentParser(
        prog="estat-dlq", parents=[common],
        description="Inspect, re-upload and purge estat-ingest dead-letter entries.",
        epilog="Exit codes: 0 done, 1 something failed, 2 bad usage or settings.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("list", parents=[common], help="one line per entry")
    show = commands.add_parser("show", parents=[common],
                               help="an entry's meta.json and first lines")
    show.add_argument("id", metavar="ID", help="an entry ID as `list` prints it, or a "
                                                "unique prefix of one")
    show.add_argument("--lines", type=int, default=10, help="data lines to print (10)")
    replay = commands.add_parser(
        "replay", parents=[common],
        help="upload entries now with the server's store and settings; delete them "
             "once stored")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", metavar="ID", nargs="*", default=[])
    which.add_argument("--all", action="store_true", help="every entry, oldest first")
    purge = commands.add_parser("purge", parents=[common],
                                help="delete entries without uploading them (data loss)")
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", metavar="ID", nargs="*", default=[])
    which.add_argument("--older-than", type=parse_duration, metavar="DURATION",
                       help="entries created longer ago than e.g. 7d, 12h, 30m")
    commands.add_parser("verify", parents=[common],
                        help="check every entry's gzip, JSON lines and event count")
    return parser


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Settings as the server would build them: options beat the env file,
    which beats the environment, which beats the defaults."""
    env = dict(environ)
    if hasattr(args, "env_file"):
        from_file = read_env_file(args.env_file)
        env.update(from_file)
        # the store (botocore) reads credentials and endpoints from os.environ
        os.environ.update(from_file)
    given = {o.name: getattr(args, o.name.replace("-", "_"), None) for o in _CLI_OPTIONS}
    try:
        return load_settings(given, env)
    except ConfigError as error:
        raise Failed(str(error)) from None


COMMANDS: dict[str, Callable[..., None]] = {
    "list": cmd_list, "show": cmd_show, "verify": cmd_verify, "purge": cmd_purge,
}


def run(argv: Optional[Sequence[str]] = None,
        environ: Optional[Mapping[str, str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("replay", "purge") and not (
            args.ids or getattr(args, "all", False)
            or getattr(args, "older_than", None) is not None):
        parser.error(f"{args.command} needs entry IDs or "
                     + ("--all" if args.command == "replay" else "--older-than"))
    report = Reporter(sys.stdout, sys.stderr)
    try:
        settings = load(args, os.environ if environ is None else environ)
    except Failed as error:
        report.fail(str(error))
        return EXIT_USAGE
    dlq = DeadLetterDir(settings.dlq_dir)
    try:
        dlq.check()
        if args.command == "replay":
            cmd_replay(dlq, args, report, settings)
        else:
            COMMANDS[args.command](dlq, args, report)
    except Failed as error:
        report.fail(str(error))
    except dlqdisk.EntryError as error:
        report.fail(f"the entry cannot be read: {error}.")
    except OSError as error:
        report.fail(f"{error.filename or dlq.root}: {error.strerror}.")
    return report.code()


def main() -> NoReturn:
    """The console script."""
    sys.exit(run())
