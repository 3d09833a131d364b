"""What each install of Quartermaster brings: the client (`pip install quartermaster`: the SDK and the
wire contract) or the server (`quartermaster[server]`: everything `qm` runs)."""

SERVER = "quartermaster[server]"
# the project's own top-level packages: one of them missing is a bug, not the client install
OURS = ("app", "workers", "reapers", "schemas")
