"""Slack alerts: the `alerts` process watches events, dead letters and the database and posts what
an operator must know (blocked accounts, long waits, dead letters, outbox lag) and when it clears."""
