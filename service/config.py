"""One frozen configuration, read from the environment in one place."""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the API, the worker and the CLI need to know."""

    database_url: str
    broker_url: str
    data_dir: Path
    admin_token: str
    secret_keys: tuple[str, ...]
    # HMAC keys of the audit chain (RETORT_AUDIT_KEY, comma-separated: the first
    # extends the chain, every one verifies), kept outside the state database.
    audit_keys: tuple[str, ...] = ()
    port: int = 8080
    host: str = "127.0.0.1"
    # The broker queue jobs go to (several Retorts may share one Redis).
    queue: str = "retort"
    # The sweeper runs this often; a job queued this long is sent again.
    sweep_interval_s: float = 10.0
    redispatch_after_s: float = 300.0
    # Lease on a target database, held in Retort's own database.
    lease_ttl_s: float = 30.0
    # How long a job waits for the lease and the target's session lock.
    lock_wait_timeout_s: float = 600.0
    # Connecting to a target: attempts and the first backoff (doubles each time).
    connect_attempts: int = 4
    connect_backoff_s: float = 0.5
    connect_timeout_s: int = 5
    # Absolute folders SQLite targets must lie in (RETORT_SQLITE_ROOTS, separated
    # by os.pathsep). from_env's default, with the variable unset: the data
    # directory's targets/ folder only; set but empty: no SQLite target at all.
    sqlite_roots: tuple[str, ...] = ()
    # A job whose worker was lost is run again from the target's current heads,
    # up to this many attempts in all.
    max_attempts: int = 3
    # On SIGTERM a worker lets its running migration finish for this long, then
    # stops it (the target rolls back), frees the lease and hands the job over.
    shutdown_grace_s: float = 25.0
    # Where revision code runs (docs/security.md): "auto" picks bubblewrap when
    # it runs on this machine, else a plain exec'd process (and says so);
    # "bwrap" requires the full sandbox and refuses jobs without it;
    # "process" never uses bwrap. RETORT_BWRAP_PATH: a bwrap binary to use.
    sandbox: str = "auto"
    bwrap_path: str = ""
    # Limits of each runner process (0: none): address space, CPU seconds over
    # its life, largest file it may write, processes beyond what its user runs.
    runner_memory_mb: int = 2048
    runner_cpu_s: int = 3600
    runner_file_mb: int = 4096
    runner_processes: int = 64
    # Warm runners one worker process keeps (one project each), how long an
    # idle one is kept, and the memory past which one is retired after a job.
    runner_max_warm: int = 4
    runner_idle_s: float = 300.0
    runner_max_rss_mb: int = 512
    # Under bwrap, a runner binds this many of its project's SQLite files (0: all).
    runner_sqlite_group: int = 200
    runner_start_timeout_s: float = 30.0
    # Benchmarks only: each runner writes a cProfile of its life to this folder.
    runner_profile_dir: str = ""
    # A job's wall-clock limit unless its project sets max_duration_s: past
    # it the job fails with `timeout`, its step rolled back, the lease freed.
    job_max_duration_s: float = 3600.0
    # Projects' environments (docs/environments.md): where pip finds packages
    # (empty: pip's own default, PyPI), a folder of wheels (pip --find-links),
    # no index at all (only that folder), how long a build may take and how
    # many environments one machine keeps.
    env_index_url: str = ""
    env_extra_index_url: str = ""
    env_trusted_host: str = ""
    env_find_links: str = ""
    env_no_index: bool = False
    env_build_timeout_s: float = 900.0
    env_cache_max: int = 16
    max_bundle_bytes: int = 16 * 1024 * 1024
    max_bundle_expanded_bytes: int = 64 * 1024 * 1024
    max_bundle_files: int = 2000
    max_bundle_file_bytes: int = 4 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    # The API under gunicorn: threads per process bound the long polls it holds.
    api_processes: int = 2
    api_threads: int = 64
    # State connections each API process keeps open: as many as its requests
    # use at once, or it opens and closes a connection per request under load.
    api_state_pool: int = 16
    # `GET /v1/jobs/{id}?wait=S` holds a request at most this long.
    max_wait_s: float = 30.0
    # How often one thread per API process looks at the jobs its requests wait
    # on; while the broker's Redis channel is live (workers publish each move),
    # only every watch_live_interval_s, for a publish that failed.
    watch_interval_s: float = 0.05
    watch_live_interval_s: float = 1.0
    # An Idempotency-Key is remembered this long.
    idempotency_ttl_s: float = 24 * 3600.0
    # Webhook deliveries: attempts, the first retry delay (doubling, capped), timeout.
    webhook_max_attempts: int = 12
    webhook_backoff_s: float = 2.0
    webhook_backoff_max_s: float = 600.0
    webhook_timeout_s: float = 5.0
    # Networks webhook URLs may reach although they are not public (loopback,
    # private, link-local...): comma-separated CIDRs, e.g. "127.0.0.0/8,::1/128".
    # Empty: public addresses only.
    webhook_allow_networks: str = ""
    # Request handling (issue 16): JSON nesting depth, the time a client has to
    # send its whole body, and per token per API process the long polls and
    # event streams it may hold and the requests it may have in flight.
    max_json_depth: int = 32
    body_timeout_s: float = 10.0
    max_streams_per_token: int = 8
    max_requests_per_token: int = 32
    # Unauthenticated refusals: at most one audit event per source per window.
    refusal_audit_window_s: float = 60.0
    # The audit chain's signed checkpoints (the sweeper writes them this often).
    audit_checkpoint_interval_s: float = 60.0
    audit_signing_key_file: str = ""
    # Each checkpoint is also POSTed here (signed like webhooks, with this secret):
    # a copy outside Retort's machines, for the operator's own receiver.
    audit_checkpoint_webhook_url: str = ""
    audit_checkpoint_webhook_secret: str = ""
    # Plans in the rolled-back mode (PostgreSQL) take real locks: each waits at
    # most this long for one, then the plan fails saying which table.
    plan_lock_timeout_ms: int = 2000
    # Drift checks build the bundle's schema in a throwaway database on these
    # servers (credentials that may CREATE DATABASE); empty: the target's own
    # server, with the target's credentials. SQLite: a temporary file.
    drift_scratch_url_postgresql: str = ""
    drift_scratch_url_mysql: str = ""
    # The lint renders an upgrade's SQL by running its revisions offline: past
    # this many seconds (a revision busy in its own code) it gives up and says
    # so (an `unparsed_statement` finding) instead of holding the job.
    lint_render_timeout_s: float = 10.0
    # How often the sweeper looks for databases whose project's drift check is due.
    drift_sweep_interval_s: float = 60.0
    # Observability (docs/metrics.md): the folder every Retort process of this
    # machine writes its metrics to (empty: <data dir>/metrics); a bearer token
    # scrapers must send (empty: /metrics is public); the port a worker, webhook
    # sender or sweeper serves the machine's metrics on (0: none, see
    # --metrics-port); log lines as "text" or "json".
    metrics_dir: str = ""
    metrics_token: str = ""
    metrics_port: int = 0
    log_format: str = "text"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Config:
        """Build the config from RETORT_* variables; the embedded default fills in the rest."""
        env = dict(os.environ if env is None else env)
        data_dir = Path(
            overrides.pop("data_dir", None) or env.get("RETORT_DATA_DIR") or "./retort-data"
        ).resolve()
        port = int(overrides.pop("port", None) or env.get("RETORT_PORT") or 8080)
        database_url = env.get("RETORT_DATABASE_URL") or f"sqlite:///{data_dir / 'retort.db'}"
        broker_url = env.get("RETORT_BROKER_URL") or f"redis+socket://{data_dir / 'redis.sock'}"
        admin_token = env.get("RETORT_ADMIN_TOKEN") or _file_secret(
            data_dir / "admin-token", lambda: "rt_" + secrets.token_urlsafe(32)
        )
        keys = env.get("RETORT_SECRET_KEY") or _file_secret(
            data_dir / "secret-key", lambda: Fernet.generate_key().decode()
        )
        audit = env.get("RETORT_AUDIT_KEY") or _file_secret(
            data_dir / "audit-key", lambda: secrets.token_hex(32)
        )
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = {}
        for name in fields:
            var = "RETORT_" + name.upper()
            if var in env and name not in {
                "database_url",
                "broker_url",
                "data_dir",
                "admin_token",
                "secret_keys",
                "audit_keys",
                "port",
                "sqlite_roots",
            }:
                typ = type(getattr(cls, name))
                if typ is bool:
                    extra[name] = env[var].strip().lower() in ("1", "true", "yes", "on")
                else:
                    extra[name] = typ(env[var])
        extra["sqlite_roots"] = _sqlite_roots(env.get("RETORT_SQLITE_ROOTS"), data_dir)
        extra.update(overrides)
        return cls(
            database_url=database_url,
            broker_url=broker_url,
            data_dir=data_dir,
            admin_token=admin_token,
            # Comma-separated: the first key encrypts, every key decrypts (rotation).
            secret_keys=_key_list(keys),
            audit_keys=_key_list(audit),
            port=port,
            **extra,
        )

    def drift_scratch_url(self, dialect: str) -> str | None:
        """The scratch server a drift check of this dialect builds on (None: the target's)."""
        if dialect == "postgresql":
            return self.drift_scratch_url_postgresql or None
        if dialect == "mysql":
            return self.drift_scratch_url_mysql or None
        return None

    @property
    def embedded_broker(self) -> bool:
        return (
            self.broker_url.startswith("redis+socket://") and str(self.data_dir) in self.broker_url
        )

    @property
    def max_waiters(self) -> int:
        """Long polls one API process holds at once; the other threads stay free for reads."""
        reserve = 16 if self.api_threads > 32 else self.api_threads // 2
        return max(1, self.api_threads - reserve)

    @property
    def webhook_queue(self) -> str:
        """Deliveries have their own queue and worker: a slow receiver never holds a migration."""
        return f"{self.queue}.webhooks"

    @property
    def audit_signing_key_path(self) -> Path:
        """The Ed25519 key that signs audit checkpoints (its public key: + ".pub")."""
        return Path(self.audit_signing_key_file or self.data_dir / "audit-signing-key")

    @property
    def metrics_path(self) -> Path:
        """The folder of this machine's metrics files (prometheus_client's multiprocess mode)."""
        return Path(self.metrics_dir).resolve() if self.metrics_dir else self.data_dir / "metrics"

    @property
    def bundle_cache_dir(self) -> Path:
        return self.data_dir / "bundle-cache"

    def as_env(self) -> dict[str, str]:
        """Return the variables that make a child process build this same config."""
        env = {
            "RETORT_SECRET_KEY": ",".join(self.secret_keys),
            "RETORT_AUDIT_KEY": ",".join(self.audit_keys),
        }
        for f in dataclasses.fields(self):
            if f.name not in ("secret_keys", "audit_keys"):
                env["RETORT_" + f.name.upper()] = str(getattr(self, f.name))
        env["RETORT_SQLITE_ROOTS"] = os.pathsep.join(self.sqlite_roots)
        return env


def _key_list(raw: str) -> tuple[str, ...]:
    """Comma-separated keys: the first encrypts (or extends the chain), every one verifies."""
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def _sqlite_roots(raw: str | None, data_dir: Path) -> tuple[str, ...]:
    """Parse RETORT_SQLITE_ROOTS; unset means the data directory's targets/ folder."""
    if raw is None:
        return (str(data_dir / "targets"),)
    roots = tuple(os.path.normpath(p.strip()) for p in raw.split(os.pathsep) if p.strip())
    relative = [p for p in roots if not os.path.isabs(p)]
    if relative:
        raise ValueError(f"RETORT_SQLITE_ROOTS takes absolute paths, not {relative}")
    return roots


def _file_secret(path: Path, make) -> str:
    """Read a generated secret from the data directory, creating it (0600) on first use."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
