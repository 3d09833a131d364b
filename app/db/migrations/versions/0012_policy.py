"""Blocking-avoidance policy in the database: use budgets, rate-limit scopes, proxies pinned to
accounts, account health; and a site's capacity kept while an operator pauses it.

- Budgets. ``sites.account_budget`` grants (or reported units) per account per
  ``account_budget_seconds``, counted from ``job_grants`` (``units``, 1 unless reported) in the
  grant's own statement; ``sites.grants_per_minute`` is a token bucket whose state is the site's
  row (``bucket_tokens`` at ``bucket_at``), refilled from the database clock.
- Scopes. A job may name a ``scope``; a rate limit reported for a scope rests the account for that
  scope only (``account_scope_rests``) and leaves it grantable for the others.
- Proxies. ``proxies`` of a site, their URL sealed at rest (``url_sealed``; ``label`` is scheme,
  host and port only); an account keeps the proxy it was pinned to on its first grant
  (``accounts.proxy_id``); a proxy carries at most ``max_accounts`` accounts.
- Health. ``accounts.consecutive_blocks`` and ``consecutive_errors`` (reset by a success),
  ``created_at`` for the age; ``sites.retire_after_blocks`` deactivates an account after that many
  blocks in a row.
- ``sites.paused_capacity``: the capacity a paused site had (its capacity is 0 while paused).

Revision ID: 0012
Revises: 0011
"""

from app.db.scripts import execute_script

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TYPE proxy_status AS ENUM ('ACTIVE', 'BLOCKED');

CREATE TABLE proxies (
    id                   bigserial PRIMARY KEY,
    site                 text NOT NULL REFERENCES sites (slug) ON DELETE CASCADE,
    -- scheme://host:port, never the credentials: what lists, logs and events show
    label                text NOT NULL CHECK (length(label) BETWEEN 1 AND 300),
    url_sealed           bytea NOT NULL,
    max_accounts         integer NOT NULL DEFAULT 1 CHECK (max_accounts > 0),
    status               proxy_status NOT NULL DEFAULT 'ACTIVE',
    -- a proxy that failed rests until then (cooldown); a BLOCKED one waits for an operator
    available_at         timestamptz NOT NULL DEFAULT now(),
    -- the rest after a reported failure, and how many failures in a row block the proxy
    cooldown_seconds     integer NOT NULL DEFAULT 300 CHECK (cooldown_seconds >= 0),
    block_after          integer NOT NULL DEFAULT 3 CHECK (block_after > 0),
    consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    failure_count        integer NOT NULL DEFAULT 0 CHECK (failure_count >= 0),
    blocked_reason       text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX proxies_of_site ON proxies (site, id);
-- an operator names a proxy by its site and label (`qm proxies block SITE URL`)
CREATE UNIQUE INDEX proxies_site_label ON proxies (site, label);

ALTER TABLE sites
    ADD COLUMN account_budget integer CHECK (account_budget > 0),
    ADD COLUMN account_budget_seconds integer NOT NULL DEFAULT 3600
        CHECK (account_budget_seconds > 0),
    ADD COLUMN grants_per_minute integer CHECK (grants_per_minute > 0),
    ADD COLUMN bucket_tokens double precision,
    ADD COLUMN bucket_at timestamptz,
    ADD COLUMN proxy_required boolean NOT NULL DEFAULT false,
    ADD COLUMN retire_after_blocks integer CHECK (retire_after_blocks > 0),
    ADD COLUMN paused_capacity integer CHECK (paused_capacity >= 0);

ALTER TABLE accounts
    ADD COLUMN proxy_id bigint REFERENCES proxies (id) ON DELETE SET NULL,
    ADD COLUMN consecutive_blocks integer NOT NULL DEFAULT 0 CHECK (consecutive_blocks >= 0),
    ADD COLUMN consecutive_errors integer NOT NULL DEFAULT 0 CHECK (consecutive_errors >= 0),
    ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX accounts_of_proxy ON accounts (proxy_id) WHERE proxy_id IS NOT NULL;

ALTER TABLE jobs ADD COLUMN scope text CHECK (scope ~ '^[a-z0-9][a-z0-9._-]{0,31}$');

ALTER TABLE job_grants
    ADD COLUMN scope text,
    ADD COLUMN units integer NOT NULL DEFAULT 1 CHECK (units >= 0),
    ADD COLUMN proxy_id bigint,
    -- the lease reported its proxy failed: counted once per lease
    ADD COLUMN proxy_failed boolean NOT NULL DEFAULT false;
-- the account budget's window: an account's grants since a moment
CREATE INDEX job_grants_account_window ON job_grants (account_id, granted_at) INCLUDE (units)
    WHERE account_id IS NOT NULL;

CREATE TABLE account_scope_rests (
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    scope      text NOT NULL,
    rest_until timestamptz NOT NULL,
    PRIMARY KEY (account_id, scope)
);
CREATE INDEX account_scope_rests_ends ON account_scope_rests (rest_until);
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS account_scope_rests;
DROP INDEX IF EXISTS job_grants_account_window;
ALTER TABLE job_grants DROP COLUMN IF EXISTS scope, DROP COLUMN IF EXISTS units,
    DROP COLUMN IF EXISTS proxy_id, DROP COLUMN IF EXISTS proxy_failed;
ALTER TABLE jobs DROP COLUMN IF EXISTS scope;
ALTER TABLE accounts DROP COLUMN IF EXISTS proxy_id, DROP COLUMN IF EXISTS consecutive_blocks,
    DROP COLUMN IF EXISTS consecutive_errors, DROP COLUMN IF EXISTS created_at;
ALTER TABLE sites DROP COLUMN IF EXISTS account_budget, DROP COLUMN IF EXISTS account_budget_seconds,
    DROP COLUMN IF EXISTS grants_per_minute, DROP COLUMN IF EXISTS bucket_tokens,
    DROP COLUMN IF EXISTS bucket_at, DROP COLUMN IF EXISTS proxy_required,
    DROP COLUMN IF EXISTS retire_after_blocks, DROP COLUMN IF EXISTS paused_capacity;
DROP TABLE IF EXISTS proxies;
DROP TYPE IF EXISTS proxy_status;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
