"""Spark jobs (spark-submit entry points)."""
