"""IngestSettings: the ingest service's configuration, from `KOTADB_INGEST_*` and the shared variables."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from services.common.settings import ServiceSettings, setting


@dataclasses.dataclass(frozen=True)
class IngestSettings(ServiceSettings):
    """IngestSettings configures the ingest process; later ingest work adds worker settings here."""

    env_prefix: ClassVar[str] = "KOTADB_INGEST_"
    service_name: ClassVar[str] = "ingest"

    port: int = setting(50052, minimum=0, help="gRPC port of the ingest service; 0 picks a free one.")
    db_statement_timeout: float = setting(
        30.0,
        env="KOTADB_INGEST_DB_STATEMENT_TIMEOUT",
        minimum=0.01,
        help="Seconds one ingest query may run (client command timeout and server `statement_timeout`);"
        " batch writes of documents and their symbols need more than the 1.5 s that"
        " bounds auth's Check path. Past it the call fails UNAVAILABLE (DATABASE_UNAVAILABLE).",
    )
    metrics_port: int = setting(
        9462,
        minimum=0,
        help="Prometheus `GET /metrics` port of the ingest service; 0 picks a free one.",
    )

    # --- Documents (ingest-docs): limits on what one request may carry, symbols, idempotency ---
    max_document_bytes: int = setting(
        10 * 1024 * 1024,
        minimum=1,
        help="Hard limit on one document's content in bytes; larger documents are refused per item.",
    )
    max_batch_items: int = setting(
        1000, minimum=1, help="Most documents one UpsertDocuments request (or one stream batch) may carry."
    )
    max_batch_bytes: int = setting(
        14 * 1024 * 1024,
        minimum=1,
        help="Most content bytes one UpsertDocuments request may carry (gRPC message limits apply too).",
    )
    max_metadata_bytes: int = setting(
        16 * 1024, minimum=0, help="Most bytes of metadata keys and values one document may carry."
    )
    max_tags: int = setting(32, minimum=0, help="Most tags one document may carry.")
    stream_batch_items: int = setting(
        500, minimum=1, help="Documents StreamUpsertDocuments commits per transaction."
    )
    stream_batch_bytes: int = setting(
        8 * 1024 * 1024,
        minimum=1,
        help="Content bytes after which StreamUpsertDocuments commits a batch (bounds its memory).",
    )
    stream_max_results: int = setting(
        10_000,
        minimum=1,
        help="Per-document results a StreamUpsertDocuments answer lists (rejected ones are kept first).",
    )
    symbol_workers: int = setting(
        2, minimum=1, help="Worker processes extracting tree-sitter symbols (started on first use)."
    )
    request_retention: float = setting(
        86400.0,
        minimum=60.0,
        help="Seconds a request_id's first answer is kept for retries of an ingest write.",
    )

    # --- repositories and webhooks (ingest-repos) ---------------------------------------------
    # repr=False: the keys must never reach a log line or a traceback that prints the settings.
    secret_keys: str = dataclasses.field(
        default="",
        repr=False,
        metadata={
            "help": "AES-GCM keys for webhook secrets and access tokens, `kid:<base64 32 bytes>` separated "
            "by commas; the first encrypts, all decrypt (rotation). Empty refuses to store secrets. "
            "`kotadb dev` generates one per data dir."
        },
    )
    allow_local_urls: bool = setting(
        False,
        help="Accept `file://` URLs, local paths and hosts resolving to loopback, private, link-local "
        "or metadata addresses as repository URLs (tests and the dev stack only: SSRF otherwise).",
    )
    public_url: str = setting(
        "",
        help="Public base URL of the gateway (e.g. `https://kotadb.example.com`), prefixed to each "
        "repository's webhook_url; empty gives the relative path.",
    )
    # GitHub webhook bodies reach 25 MiB and arrive as one gRPC message (HttpBody), so the ingest
    # service's message limit sits above the shared 16 MiB default.
    max_message_bytes: int = setting(
        32 * 1024 * 1024, minimum=1024, help="Largest gRPC message received or sent, in bytes."
    )
    max_webhook_bytes: int = setting(
        25 * 1024 * 1024,
        minimum=1024,
        help="Largest GitHub webhook body accepted, in bytes (GitHub caps payloads at 25 MiB).",
    )
    webhook_concurrency: int = setting(
        16,
        minimum=1,
        help="Webhook deliveries one ingest process handles at once; others wait within the deadline.",
    )
    webhook_deadline: float = setting(
        8.0,
        minimum=0.1,
        help="Seconds a webhook delivery may take (database waits included) before it is answered "
        "UNAVAILABLE; GitHub gives up after 10 s.",
    )

    # --- Jobs and workers (services/ingest/queue.py, worker.py, events.py, gitfetch.py, walk.py) ---
    workers: int = setting(
        1,
        minimum=0,
        help="Indexing workers run inside the ingest service; 0 leaves jobs to `kotadb serve ingest-worker`.",
    )
    listen_database_url: str = setting(
        "",
        help="Direct or session-mode PostgreSQL URL for LISTEN (job wake-ups, WatchJob); empty: poll only"
        " (Supabase's 6543 pooler cannot LISTEN).",
    )
    poll_interval: float = setting(
        1.0, minimum=0.01, help="Seconds between queue and job-event polls when no notification arrives."
    )
    job_lease: float = setting(
        30.0,
        minimum=0.5,
        help="Seconds a claimed job stays leased; its worker renews it every third of that.",
    )
    job_max_attempts: int = setting(5, minimum=1, help="Attempts of a job before it fails for good.")
    retry_base: float = setting(
        2.0, minimum=0.0, help="Seconds before the first retry; doubled per attempt, with jitter."
    )
    retry_max: float = setting(300.0, minimum=0.0, help="Upper bound on one retry's backoff, in seconds.")
    retention: float = setting(
        7 * 24 * 3600.0,
        minimum=60.0,
        help="Seconds finished jobs, their events and webhook deliveries are kept before pruning.",
    )
    work_dir: str = setting(
        "", help="Directory for the workers' git checkouts; empty: `kotadb-ingest` in the system temp dir."
    )
    git_timeout: float = setting(
        600.0, minimum=1.0, help="Seconds one git command may run before it is killed."
    )
    skip_dirs: str = setting(
        ".git,.hg,.svn,node_modules,vendor,third_party,bower_components,dist,build,target,__pycache__,.venv,venv",
        help="Comma-separated directory names a sync never enters (vendored and generated trees).",
    )
    sync_max_file_bytes: int = setting(
        1024 * 1024,
        minimum=1,
        help="Files larger than this are skipped by syncs, unless a repository sets its own limit.",
    )
    sync_batch_files: int = setting(200, minimum=1, help="Files written per sync transaction.")
    sync_batch_bytes: int = setting(
        8 * 1024 * 1024, minimum=1024, help="Content bytes written per sync transaction (upper bound)."
    )
    max_recorded_skips: int = setting(
        1000, minimum=0, help="Skipped files recorded with their reason on one job (counts cover the rest)."
    )
    watch_max_seconds: float = setting(
        3600.0,
        minimum=1.0,
        help="Longest one WatchJob stream stays open; the client resumes with after_sequence.",
    )


@dataclasses.dataclass(frozen=True)
class IngestWorkerSettings(IngestSettings):
    """IngestWorkerSettings configures `kotadb serve ingest-worker`: the ingest settings, its own port."""

    service_name: ClassVar[str] = "ingest-worker"

    port: int = setting(
        0,
        env="KOTADB_INGEST_WORKER_PORT",
        minimum=0,
        help="gRPC health port of `kotadb serve ingest-worker`; 0 picks a free one.",
    )
    metrics_port: int = setting(
        0,
        env="KOTADB_INGEST_WORKER_METRICS_PORT",
        minimum=0,
        help="Prometheus port of `kotadb serve ingest-worker`; 0 picks a free one (many run per machine).",
    )
