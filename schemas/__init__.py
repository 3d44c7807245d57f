"""The wire contract of the credit-metering worker (SPEC sections 5 and 6)."""
