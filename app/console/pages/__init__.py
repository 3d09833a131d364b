"""The console's pages, one module per concept; each has its ``routes``."""
