"""The initial schema: every table of the design, with the CHECKs that tie columns to states.

Revision ID: 0001
Revises:
"""

from app.db.scripts import execute_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TYPE account_status AS ENUM ('ACTIVE', 'USING', 'BLOCKED', 'INACTIVE');
CREATE TYPE seed_status    AS ENUM ('ACTIVE', 'ASSIGNED', 'DISABLED');
CREATE TYPE job_status     AS ENUM ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED',
                                    'EXPIRED', 'TIMED_OUT');
CREATE TYPE capture_status AS ENUM ('RECEIVED', 'HANDING_OFF', 'HANDED_OFF', 'FAILED');

-- Fencing tokens: every grant takes the next value, so a token only ever grows.
CREATE SEQUENCE lease_token_seq;
-- FIFO order of waiting jobs; a re-queued job takes a fresh number.
CREATE SEQUENCE job_queue_seq;

CREATE TABLE sites (
    slug                   text PRIMARY KEY CHECK (slug ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    host                   text NOT NULL CHECK (length(host) BETWEEN 1 AND 253),
    capacity               integer NOT NULL CHECK (capacity >= 0),
    -- the capacity gate (rule 3): grants add one under `running < capacity`, releases take one
    running                integer NOT NULL DEFAULT 0 CHECK (running >= 0),
    lease_seconds          integer NOT NULL DEFAULT 300 CHECK (lease_seconds > 0),
    cooldown_seconds       integer NOT NULL DEFAULT 0 CHECK (cooldown_seconds >= 0),
    block_cooldown_seconds integer NOT NULL DEFAULT 3600 CHECK (block_cooldown_seconds >= 0),
    max_attempts           integer NOT NULL DEFAULT 3 CHECK (max_attempts > 0),
    dag_id                 text,
    session_check_url      text CHECK (session_check_url ~ '^https?://'),
    created_at             timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE domain_rewrites (
    id        bigserial PRIMARY KEY,
    site      text NOT NULL REFERENCES sites (slug) ON DELETE CASCADE,
    from_host text NOT NULL,
    to_host   text NOT NULL CHECK (to_host <> from_host),
    since     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (site, from_host)
);

CREATE TABLE accounts (
    id               bigserial PRIMARY KEY,
    site             text NOT NULL REFERENCES sites (slug),
    username         text NOT NULL CHECK (length(username) BETWEEN 1 AND 320),
    secret           bytea NOT NULL,
    status           account_status NOT NULL DEFAULT 'ACTIVE',
    available_at     timestamptz NOT NULL DEFAULT now(),
    holder_job_id    text,
    lease_token      bigint NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    use_count        integer NOT NULL DEFAULT 0,
    error_count      integer NOT NULL DEFAULT 0,
    blocked_reason   text,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (site, username),
    -- a USING account has a holder and a lease; no other status has a holder
    CHECK ((status = 'USING') = (holder_job_id IS NOT NULL)),
    CHECK (status <> 'USING' OR lease_expires_at IS NOT NULL)
);
-- the grant's pick: free accounts of a site, least recently rested first
CREATE INDEX accounts_free ON accounts (site, available_at, id) WHERE status = 'ACTIVE';

CREATE TABLE sessions (
    account_id    bigint PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    storage_state bytea NOT NULL,
    version       integer NOT NULL DEFAULT 1 CHECK (version > 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE seeds (
    id               bigserial PRIMARY KEY,
    site             text NOT NULL REFERENCES sites (slug),
    url              text NOT NULL CHECK (url ~ '^https?://' AND length(url) <= 4096),
    interval_seconds integer NOT NULL DEFAULT 3600 CHECK (interval_seconds > 0),
    priority         integer NOT NULL DEFAULT 0,
    status           seed_status NOT NULL DEFAULT 'ACTIVE',
    next_due_at      timestamptz NOT NULL DEFAULT now(),
    holder_job_id    text,
    lease_token      bigint,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (site, url),
    CHECK ((status = 'ASSIGNED') = (holder_job_id IS NOT NULL)),
    CHECK (status <> 'ASSIGNED' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL))
);
CREATE INDEX seeds_due ON seeds (site, priority DESC, next_due_at, id) WHERE status = 'ACTIVE';
CREATE INDEX seeds_holder ON seeds (holder_job_id) WHERE status = 'ASSIGNED';

CREATE TABLE jobs (
    id               text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 200),
    site             text NOT NULL REFERENCES sites (slug),
    collector        text NOT NULL CHECK (length(collector) BETWEEN 1 AND 200),
    status           job_status NOT NULL,
    needs_account    boolean NOT NULL DEFAULT true,
    needs_seeds      integer NOT NULL DEFAULT 0 CHECK (needs_seeds >= 0),
    lease_seconds    integer NOT NULL CHECK (lease_seconds > 0),
    queue_seq        bigint NOT NULL DEFAULT nextval('job_queue_seq'),
    wait_deadline    timestamptz,
    lease_token      bigint,
    lease_expires_at timestamptz,
    account_id       bigint REFERENCES accounts (id),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- the job.start that queued the job: its grant or rejection answers this request
    request_id       uuid NOT NULL,
    reply_to         text NOT NULL,
    correlation_id   text NOT NULL,
    reason           text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    granted_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'QUEUED' OR wait_deadline IS NOT NULL),
    CHECK (status <> 'RUNNING' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK (status IN ('QUEUED', 'RUNNING') OR finished_at IS NOT NULL)
);
CREATE INDEX jobs_waiting ON jobs (site, queue_seq) WHERE status = 'QUEUED';
CREATE INDEX jobs_wait_deadline ON jobs (wait_deadline) WHERE status = 'QUEUED';
CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at) WHERE status = 'RUNNING';

-- Every lease ever granted: the history the capacity and exclusivity checks read.
CREATE TABLE job_grants (
    lease_token bigint PRIMARY KEY,
    job_id      text NOT NULL REFERENCES jobs (id),
    site        text NOT NULL,
    account_id  bigint,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    end_reason  text
);
CREATE INDEX job_grants_open ON job_grants (job_id) WHERE ended_at IS NULL;

CREATE TABLE captures (
    id                 text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 200),
    job_id             text NOT NULL REFERENCES jobs (id),
    site               text NOT NULL REFERENCES sites (slug),
    url                text NOT NULL CHECK (url ~ '^https?://'),
    storage_uri        text NOT NULL,
    sha256             text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    content_type       text NOT NULL,
    size               bigint NOT NULL CHECK (size >= 0),
    captured_at        timestamptz NOT NULL,
    meta               jsonb NOT NULL DEFAULT '{}',
    status             capture_status NOT NULL DEFAULT 'RECEIVED',
    attempts           integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    handoff_token      bigint,
    handoff_expires_at timestamptz,
    last_error         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'HANDING_OFF' OR (handoff_token IS NOT NULL AND handoff_expires_at IS NOT NULL))
);
CREATE INDEX captures_due ON captures (next_attempt_at) WHERE status = 'RECEIVED';
CREATE INDEX captures_handoff_expiry ON captures (handoff_expires_at) WHERE status = 'HANDING_OFF';

CREATE TABLE inbox (
    request_id   uuid PRIMARY KEY,
    job_id       text NOT NULL,
    request_type text NOT NULL,
    fingerprint  text NOT NULL,
    reply_topic  text,
    reply        jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inbox_created ON inbox (created_at);

CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    shard      smallint NOT NULL CHECK (shard >= 0),
    topic      text NOT NULL,
    key        bytea,
    -- [[name, base64 of the value], ...]: Kafka header values are bytes
    headers    jsonb NOT NULL DEFAULT '[]',
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX outbox_shard_order ON outbox (shard, id);

-- What `qm dlt replay` already sent, so a second run replays nothing twice.
CREATE TABLE dlt_replays (
    topic        text NOT NULL,
    "partition"  integer NOT NULL,
    "offset"     bigint NOT NULL,
    target_topic text NOT NULL,
    replayed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition", "offset")
);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS dlt_replays, outbox, inbox, captures, job_grants, jobs, seeds, sessions,
    accounts, domain_rewrites, sites;
DROP SEQUENCE IF EXISTS job_queue_seq, lease_token_seq;
DROP TYPE IF EXISTS capture_status, job_status, seed_status, account_status;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
