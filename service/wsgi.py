"""The WSGI entry point: `gunicorn service.wsgi:app`."""

from service import metrics
from service.app import create_app
from service.config import Config

config = Config.from_env()
metrics.configure(config)  # a no-op when gunicorn's master did it before forking
app = create_app(config)
