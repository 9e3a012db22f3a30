"""The Celery app of Retort's workers: `celery -A worker.celery_app worker`."""

from service.config import Config
from service.queue import make_celery

config = Config.from_env()
app = make_celery(config)
app.conf.update(include=["worker.tasks"])
