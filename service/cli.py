"""The `retort` command for operators."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from service.cli_base import EXIT_CODES_HELP
from service.config import Config


def _config(data_dir: str | None, port: int | None) -> Config:
    """The config of a server command, whose files only Retort's user may read."""
    overrides = {}
    if data_dir:
        overrides["data_dir"] = data_dir
    if port:
        overrides["port"] = port
    _private_files()
    config = Config.from_env(**overrides)
    _make_private(config)
    return config


def _private_files() -> None:
    """Every file a Retort process (and the processes it starts) creates: owner only.

    The state database, its journals, the bundle cache, keys, checkpoints and
    logs hold tenants' code and secrets (issue 16).
    """
    os.umask(0o077)


def _make_private(config: Config) -> None:
    """Tighten a data directory an older Retort (or a wider umask) left readable."""
    data_dir = config.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in (data_dir, *data_dir.iterdir()):
        try:
            if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
                path.chmod(0o700 if path.is_dir() else 0o600)
        except OSError:
            pass  # gone meanwhile, or not ours: left as it is


def _make_target_root(config: Config) -> None:
    """Create the data directory's SQLite target folder (data_dir/targets) where
    targets may live: it is a root (the default), or lies in one."""
    from service.serve import example_target_allowed

    default = config.data_dir / "targets"
    if str(default) in config.sqlite_roots or example_target_allowed(config, default):
        default.mkdir(parents=True, exist_ok=True)


def _version() -> str:
    """Retort's version: the installed package's, else pyproject.toml's (a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retort")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


@click.group(epilog=EXIT_CODES_HELP)
@click.version_option(_version(), prog_name="retort")
def main() -> None:
    """Retort: migration-as-a-service for Alembic."""


@main.group()
def db() -> None:
    """Retort's own state database."""


@db.command("upgrade")
@click.option("--data-dir", envvar="RETORT_DATA_DIR", help="Data directory (embedded default).")
def db_upgrade(data_dir: str | None) -> None:
    """Apply Retort's own migrations (idempotent)."""
    from service.schema import upgrade_schema

    config = _config(data_dir, None)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_schema(config.database_url)
    click.echo("Retort's state database is up to date.")


@main.command()
@click.option("--port", type=int, envvar="RETORT_PORT", help="HTTP port (default 8080).")
@click.option("--data-dir", envvar="RETORT_DATA_DIR", help="Where state lives (./retort-data).")
@click.option("--workers", default=2, show_default=True, help="Migration worker processes.")
def serve(port: int | None, data_dir: str | None, workers: int) -> None:
    """Run the API and a worker in one command (embedded default: SQLite, bundled Redis).

    Each process writes to its own file in DATA_DIR/logs; the terminal shows
    when Retort answers and how to use it. Ctrl-C (or SIGTERM) stops it: a
    running migration gets the worker's shutdown grace, then is handed back;
    a second Ctrl-C kills at once. Exits 0 after a requested stop, 1 when a
    process died or Retort never became ready (the terminal says which, with
    its last log lines).
    """
    from service import metrics
    from service import serve as stack
    from service.schema import upgrade_schema

    # Before anything else: a Ctrl-C from here on is a stop request, never a traceback.
    stopper = stack.Stopper.install()
    # The API serves this machine's metrics; no other process here listens for them.
    config = dataclasses.replace(_config(data_dir, port), metrics_port=0)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    _make_target_root(config)
    upgrade_schema(config.database_url)
    # Every Retort process of this machine starts here: no one writes the files yet.
    metrics.clear(config)
    specs = [
        stack.ChildSpec("api", api_command(config)),
        # Its warm shutdown lets a running migration go on for the grace, then hands
        # the job back: killing it sooner would leave the job to the lease's expiry.
        stack.ChildSpec(
            "worker",
            worker_command(config, workers),
            config.shutdown_grace_s + stack.STOP_TIMEOUT_S,
        ),
        stack.ChildSpec("sweeper", sweeper_command()),
        stack.ChildSpec("webhooks", webhooks_command(config, 4)),
    ]
    raise SystemExit(stack.run(config, specs, stopper))


@main.group()
def secrets() -> None:
    """Secrets stored by Retort (target database URLs, webhook signing secrets)."""


@secrets.command("rotate")
def secrets_rotate() -> None:
    """Re-encrypt every stored secret with the first key of RETORT_SECRET_KEY.

    To rotate: set RETORT_SECRET_KEY=<new>,<old> everywhere (both keys decrypt,
    the new one encrypts), run this once, then drop <old>.
    """
    from service.crypto import SecretBox, rotate_secrets
    from service.db import make_engine, transaction
    from service.sessions import make_state_sessions

    config = _config(None, None)
    engine = make_engine(config.database_url)
    try:
        with transaction(make_state_sessions(engine, config.audit_keys)) as s:
            counts = rotate_secrets(s, SecretBox(config.secret_keys), "operator")
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    click.echo(
        f"re-encrypted {counts['databases']} database URLs, {counts['webhooks']} "
        f"webhook secrets and {counts['project_secrets']} project secret variables "
        "with the first key"
    )


@main.command()
@click.option("--port", type=int, envvar="RETORT_PORT")
@click.option("--threads", type=int, help="Threads per process (default 64, RETORT_API_THREADS).")
@click.option("--processes", type=int, help="Processes (default 2, RETORT_API_PROCESSES).")
def api(port: int | None, threads: int | None, processes: int | None) -> None:
    """Run only the HTTP API under gunicorn (production).

    Threaded workers: a long poll (`?wait=`, event streams) holds a thread, and
    each process lets long polls take all but 16 of its threads, so reads and
    writes always find one free.
    """
    config = _config(None, port)
    if threads:
        config = dataclasses.replace(config, api_threads=threads)
    if processes:
        config = dataclasses.replace(config, api_processes=processes)
    cmd = api_command(config)
    os.execvpe(cmd[0], cmd, {**os.environ, **config.as_env()})


_METRICS_PORT = click.option(
    "--metrics-port",
    type=int,
    help="Serve this machine's metrics on this port (RETORT_HOST), for machines without an API.",
)


def _with_metrics_port(config: Config, port: int | None) -> Config:
    return dataclasses.replace(config, metrics_port=port) if port is not None else config


@main.command()
@click.option("--concurrency", default=2, show_default=True)
@click.option("--name", default="retort", show_default=True, help="Celery node name.")
@_METRICS_PORT
def worker(concurrency: int, name: str, metrics_port: int | None) -> None:
    """Run only a migration worker under Celery (production)."""
    config = _with_metrics_port(_config(None, None), metrics_port)
    _make_target_root(config)
    cmd = worker_command(config, concurrency, name)
    os.execvpe(cmd[0], cmd, {**os.environ, **config.as_env()})


@main.command()
@click.option("--concurrency", default=8, show_default=True, help="Deliveries sent at once.")
@click.option("--name", default="retort", show_default=True, help="Celery node name.")
@_METRICS_PORT
def webhooks(concurrency: int, name: str, metrics_port: int | None) -> None:
    """Run only a webhook sender (production): a thread pool on the webhooks queue."""
    config = _with_metrics_port(_config(None, None), metrics_port)
    cmd = webhooks_command(config, concurrency, name)
    os.execvpe(cmd[0], cmd, {**os.environ, **config.as_env()})


@main.command()
@_METRICS_PORT
def beat(metrics_port: int | None) -> None:
    """Run the job sweeper (production; one or more, each sweep is idempotent).

    It sweeps in its own process every RETORT_SWEEP_INTERVAL_S, never through
    the jobs' queue, so a full queue of migrations never delays a recovery.
    """
    config = _with_metrics_port(_config(None, None), metrics_port)
    cmd = sweeper_command()
    os.execvpe(cmd[0], cmd, {**os.environ, **config.as_env()})


def sweeper_command() -> list[str]:
    return [sys.executable, "-m", "worker.sweep"]


def api_command(config: Config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"{config.host}:{config.port}",
        "--workers",
        str(config.api_processes),
        "--worker-class",
        "gthread",
        "--threads",
        str(config.api_threads),
        "--timeout",
        "60",
        "--access-logfile",
        "-",
        "--no-control-socket",
        # Hooks: metrics before the fork, each exited worker, JSON lines.
        "--config",
        "python:service.gunicorn_conf",
        "service.wsgi:app",
    ]


def worker_command(config: Config, concurrency: int, name: str = "retort") -> list[str]:
    """A migration worker: prefork, since Alembic is not thread-safe."""
    return _celery_worker("prefork", concurrency, config.queue, f"{name}@%h", config.log_format)


def webhooks_command(config: Config, concurrency: int, name: str = "retort") -> list[str]:
    """A worker for deliveries only: threads suit waiting on receivers, and no Alembic runs here."""
    hostname = f"webhooks-{name}@%h"
    return _celery_worker("threads", concurrency, config.webhook_queue, hostname, config.log_format)


def _celery_worker(
    pool: str, concurrency: int, queue: str, hostname: str, log_format: str = "text"
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        *(["--quiet"] if log_format == "json" else []),  # no banner: every line is JSON
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "-Q",
        queue,
        "--hostname",
        hostname,
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


from service.audit_cli import register as register_audit  # noqa: E402
from service.client_cli import register  # noqa: E402
from service.manage_cli import register as register_manage  # noqa: E402
from service.rollout_cli import register as register_rollout  # noqa: E402
from service.safety_cli import register as register_safety  # noqa: E402

register(main)
register_manage(main)
register_audit(main)
register_safety(main)
register_rollout(main)

if __name__ == "__main__":
    main()
