"""batchmark: batch is the benchmark of streaming.

The shared core: event schema and validation, metric definitions, event-time window math, aggregates,
storage (Postgres schema, lake paths), configuration and the ``batchmark`` CLI. Faust (``streaming/``) and
Spark (``batch/``) are thin adapters around it.
"""

__version__ = "0.1.0"
