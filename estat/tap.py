"""twistd glue: `twistd estat-ingest` options (each also an environment
variable) and `makeService`. Bad settings stop twistd here, before it
daemonises, with one sentence instead of a traceback."""

from __future__ import annotations

import os
from typing import Any, Mapping

from twisted.application.service import IService
from twisted.python import usage

from estat.config import OPTIONS, ConfigError, Settings, load_settings, option_named


def _describe(help_text: str, env: str, default: str) -> str:
    shown = default if default else "(empty)"
    return f"{help_text} [env {env}, default {shown}]"


_LISTEN = option_named("listen")


def check_directory(label: str, path: str) -> None:
    """Create `path` if needed and make sure we can write there."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{label} {path!r} cannot be created: {error.strerror}.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{label} {path!r} is not writable by this user.")


def check_endpoint(label: str, description: str) -> None:
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(
            f"{label} {description!r} is not a Twisted endpoint such as tcp:8080 "
            f"({error}).") from None


def validate_environment(settings: Settings) -> None:
    """Checks that need the machine, not just the text of the settings."""
    for description in settings.listen:
        check_endpoint("LISTEN", description)
    check_endpoint("ADMIN_LISTEN", settings.admin_listen)
    if settings.s3_bucket:
        from estat.stores.s3 import check_s3_settings

        check_s3_settings(settings)
    else:
        check_directory("OUTPUT_DIR", settings.output_dir)
    check_directory("DLQ_DIR", settings.dlq_dir)
    if settings.workers > 1:
        from estat.workers.supervisor import tcp_listen_address

        for description in settings.listen:
            tcp_listen_address(description)
    if settings.auth_tokens_file:
        from estat.auth import TokensFileError, read_tokens_file

        try:
            read_tokens_file(settings.auth_tokens_file)
        except TokensFileError as error:
            raise ConfigError(str(error)) from None


class Options(usage.Options):
    """Every setting of estat-ingest; an option beats its environment
    variable, which beats the default."""

    synopsis = "[options]"
    longdesc = (
        "Accepts JSON events on POST /collect, batches them and writes gzip'd "
        "JSON Lines objects to S3 (when S3_BUCKET is set) or to a local directory. "
        "Every option can also be set with the environment variable named in its "
        "help; see etc/estat-ingest.env."
    )
    optParameters = [
        [o.name, None, None, _describe(o.help, o.env, o.default)]
        for o in OPTIONS if not o.repeatable
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        for option in OPTIONS:
            if option.repeatable:
                self[option.name] = []
        self.environ = os.environ if environ is None else environ
        self.settings: Settings | None = None

    def opt_listen(self, description: str) -> None:
        self["listen"].append(description)

    opt_listen.__doc__ = _describe(_LISTEN.help, _LISTEN.env, _LISTEN.default)

    def postOptions(self) -> None:
        try:
            settings = load_settings(self, self.environ)
            validate_environment(settings)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None
        self.settings = settings


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    assert options.settings is not None
    reactor_: Any = reactor
    if options.settings.workers > 1:
        from estat.workers.supervisor import WorkerSupervisor

        return WorkerSupervisor(options.settings, reactor_)
    from estat.service import IngestService, build

    return IngestService(build(options.settings, reactor_), own_signals=True)
