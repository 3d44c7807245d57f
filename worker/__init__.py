"""Credit-metering worker: usage events in, atomic debits, pause/resume signals out."""

__version__ = "0.1.0"
