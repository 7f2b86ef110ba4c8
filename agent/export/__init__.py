"""Metrics export: one OpenTelemetry MeterProvider, scraped by Prometheus (and OTLP when configured)."""
