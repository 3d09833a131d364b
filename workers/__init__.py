"""FastStream subscribers: the claim worker's request handlers and the handoff worker."""
