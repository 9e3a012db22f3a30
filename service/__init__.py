"""Retort: migration-as-a-service for Alembic."""
