"""The operator's web console (`qm run console`, docs/console.md): server-rendered pages of every
site, account, job, seed, capture and dead letter, and the actions the CLI has, behind sign-in."""
