"""The Faust app: thin adapters from topics to the core's stream processor."""
