"""Retort's Celery worker."""
