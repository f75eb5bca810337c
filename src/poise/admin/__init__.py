"""The admin API, metrics and dashboard."""
