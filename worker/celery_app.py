"""The Celery app of Retort's workers: `celery -A worker.celery_app worker`."""

import logging

from celery import signals

from service import logs, metrics
from service.config import Config
from service.queue import make_celery

config = Config.from_env()
metrics.configure(config)  # in the main process: the pool processes it forks inherit it
app = make_celery(config)
app.conf.update(include=["worker.tasks"])


def _log_level(loglevel=None, **_) -> None:
    logging.getLogger().setLevel(loglevel or logging.INFO)  # --loglevel; the handler is there


if config.log_format == "json":
    logs.configure("json")  # now: what is logged before Celery sets logging up, too
    signals.setup_logging.connect(_log_level, weak=False)  # Celery leaves logging to Retort
