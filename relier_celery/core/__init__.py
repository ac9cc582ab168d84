"""Core: what every layer shares and nothing else provides: errors, Redis key names, message
records and headers, settings, events. Imports nothing else from relier_celery."""
