"""gunicorn's settings for `retort api`: `gunicorn -c python:service.gunicorn_conf`.

Only what the command line cannot say. The master turns metrics on before it
forks its workers (they inherit prometheus_client's multiprocess mode and
write files of their own pid), tells prometheus_client of each worker that
exits, and with RETORT_LOG_FORMAT=json writes gunicorn's own lines (its
master's, the access log) and Retort's as JSON lines.
"""

import logging

from gunicorn.glogging import Logger

from service import logs, metrics
from service.config import Config

_config = Config.from_env()
metrics.configure(_config)


class _JsonLogger(Logger):
    def setup(self, cfg) -> None:
        super().setup(cfg)
        logs.reformat("json", self.error_log, self.access_log)


if _config.log_format == "json":
    logger_class = _JsonLogger
    # The root logger, which every worker inherits: the lines text mode shows
    # (Python's last resort: warnings and errors), as JSON.
    logs.configure("json", logging.WARNING)


def child_exit(server, worker) -> None:
    metrics.process_exited(worker.pid)
