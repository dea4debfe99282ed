"""Settings, the error hierarchy, typed YAML config files and our Prometheus metrics:
what every other package may import."""
