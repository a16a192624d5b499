-- Repositories, the durable indexing job queue with its event log, and GitHub webhook deliveries.

create table if not exists public.repositories (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  -- full_name is the provider's "owner/name".
  full_name text not null check (char_length(full_name) between 1 and 512),
  url text not null check (char_length(url) between 1 and 2048),
  provider text not null default 'github' check (provider in ('github', 'gitlab', 'git')),
  default_branch text not null default 'main',
  -- Secrets are AES-GCM ciphertexts (nonce || ciphertext || tag) under a key the services hold:
  -- a webhook HMAC cannot be verified from a hash of its secret.
  webhook_secret_encrypted bytea,
  access_token_encrypted bytea,
  last_synced_commit text,
  last_synced_at timestamptz,
  state text not null default 'pending'
    check (state in ('pending', 'syncing', 'ready', 'error', 'deleting')),
  error jsonb,
  -- settings holds include/exclude patterns and size limits chosen at creation.
  settings jsonb not null default '{}'::jsonb,
  request_id text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint repositories_user_id_provider_full_name_key unique (user_id, provider, full_name),
  constraint repositories_id_user_id_key unique (id, user_id)
);

create unique index if not exists repositories_user_id_request_id_idx
  on public.repositories (user_id, request_id) where request_id is not null;

comment on table public.repositories is
  'Source repositories a user registered for indexing, with encrypted webhook secret and token.';

create or replace trigger repositories_set_updated_at
  before update on public.repositories
  for each row execute function public.set_updated_at();

alter table public.repositories enable row level security;
alter table public.repositories force row level security;
drop policy if exists repositories_owner on public.repositories;
create policy repositories_owner on public.repositories
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.repositories from public, anon, authenticated;
grant select, insert, update, delete on table public.repositories to service_role, authenticated;


create table if not exists public.indexing_jobs (
  id uuid primary key default gen_random_uuid(),
  repository_id uuid,
  user_id uuid not null references auth.users (id) on delete cascade,
  kind text not null check (kind in ('sync', 'webhook_push', 'reindex', 'delete')),
  state text not null default 'queued'
    check (state in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
  attempt integer not null default 0 check (attempt >= 0),
  max_attempts integer not null default 5 check (max_attempts > 0),
  priority integer not null default 0,
  run_after timestamptz not null default now(),
  locked_by text,
  locked_until timestamptz,
  -- params carries what the job needs (ref, commit sha, webhook delivery id).
  params jsonb not null default '{}'::jsonb,
  progress jsonb not null default '{}'::jsonb,
  error jsonb,
  request_id text,
  cancel_requested_at timestamptz,
  started_at timestamptz,
  finished_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint indexing_jobs_id_user_id_key unique (id, user_id),
  constraint indexing_jobs_repository_fkey foreign key (repository_id, user_id)
    references public.repositories (id, user_id) on delete cascade
);

-- The dequeue path: `... where state = 'queued' and run_after <= now()
-- order by priority desc, run_after for update skip locked`.
create index if not exists indexing_jobs_dequeue_idx
  on public.indexing_jobs (priority desc, run_after) where state = 'queued';
-- Reaping jobs whose worker died: running jobs with an expired lease.
create index if not exists indexing_jobs_lease_idx
  on public.indexing_jobs (locked_until) where state = 'running';
create index if not exists indexing_jobs_user_id_created_at_idx
  on public.indexing_jobs (user_id, created_at desc);
create index if not exists indexing_jobs_repository_id_created_at_idx
  on public.indexing_jobs (repository_id, created_at desc) where repository_id is not null;
create unique index if not exists indexing_jobs_user_id_request_id_idx
  on public.indexing_jobs (user_id, request_id) where request_id is not null;

comment on table public.indexing_jobs is
  'Durable indexing job queue: leased by workers (locked_by/locked_until), retried with backoff.';

create or replace trigger indexing_jobs_set_updated_at
  before update on public.indexing_jobs
  for each row execute function public.set_updated_at();

alter table public.indexing_jobs enable row level security;
alter table public.indexing_jobs force row level security;
drop policy if exists indexing_jobs_owner on public.indexing_jobs;
create policy indexing_jobs_owner on public.indexing_jobs
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.indexing_jobs from public, anon, authenticated;
grant select, insert, update, delete on table public.indexing_jobs to service_role;
-- Users enqueue and cancel their own jobs; only workers (service role) lease and finish them.
grant select on table public.indexing_jobs to authenticated;
grant insert (id, repository_id, user_id, kind, priority, params, request_id)
  on table public.indexing_jobs to authenticated;
grant update (cancel_requested_at) on table public.indexing_jobs to authenticated;


create table if not exists public.indexing_job_events (
  job_id uuid not null,
  user_id uuid not null references auth.users (id) on delete cascade,
  -- seq numbers a job's events 1, 2, 3, ... so watchers resume after the last one they saw.
  seq integer not null check (seq > 0),
  state text not null,
  message text not null default '',
  data jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  primary key (job_id, seq),
  constraint indexing_job_events_job_fkey foreign key (job_id, user_id)
    references public.indexing_jobs (id, user_id) on delete cascade
);

create index if not exists indexing_job_events_user_id_idx on public.indexing_job_events (user_id);

comment on table public.indexing_job_events is
  'Append-only progress log of each indexing job, numbered per job for resumable watching.';

alter table public.indexing_job_events enable row level security;
alter table public.indexing_job_events force row level security;
drop policy if exists indexing_job_events_owner on public.indexing_job_events;
create policy indexing_job_events_owner on public.indexing_job_events
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.indexing_job_events from public, anon, authenticated;
grant select, insert, update, delete on table public.indexing_job_events to service_role;
grant select on table public.indexing_job_events to authenticated;


create table if not exists public.webhook_deliveries (
  id uuid primary key default gen_random_uuid(),
  repository_id uuid not null,
  user_id uuid not null references auth.users (id) on delete cascade,
  -- delivery_id is GitHub's X-GitHub-Delivery; unique per repository so redeliveries are no-ops.
  delivery_id text not null,
  event text not null,
  signature_valid boolean not null,
  payload_sha256 text,
  received_at timestamptz not null default now(),
  job_id uuid,
  constraint webhook_deliveries_repository_id_delivery_id_key unique (repository_id, delivery_id),
  constraint webhook_deliveries_repository_fkey foreign key (repository_id, user_id)
    references public.repositories (id, user_id) on delete cascade,
  constraint webhook_deliveries_job_fkey foreign key (job_id, user_id)
    references public.indexing_jobs (id, user_id) on delete set null (job_id)
);

create index if not exists webhook_deliveries_user_id_received_at_idx
  on public.webhook_deliveries (user_id, received_at desc);
create index if not exists webhook_deliveries_job_id_idx
  on public.webhook_deliveries (job_id) where job_id is not null;

comment on table public.webhook_deliveries is
  'Every GitHub webhook delivery received, whether its signature verified, and the job it queued.';

alter table public.webhook_deliveries enable row level security;
alter table public.webhook_deliveries force row level security;
drop policy if exists webhook_deliveries_owner on public.webhook_deliveries;
create policy webhook_deliveries_owner on public.webhook_deliveries
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.webhook_deliveries from public, anon, authenticated;
grant select, insert, update, delete on table public.webhook_deliveries to service_role;
grant select on table public.webhook_deliveries to authenticated;

grant usage, select on all sequences in schema public to service_role;
