"""The domain core: every transition of a job, seed, session and capture is decided here.

Each module is one aggregate's transitions; each runs inside the caller's transaction (``Tx``),
reads and writes through ``app.store`` and writes its replies and events to the transaction's
outbox. The core calls no process: ``workers`` and ``reapers`` call it.
"""
