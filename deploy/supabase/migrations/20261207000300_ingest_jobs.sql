-- The indexing job queue's rules (services/ingest/queue.py holds the statements that use them).
--
-- * A job means "bring repository X to its newest head", so a repository has at most one queued
--   and at most one running job (two partial unique indexes). A later push folds into the queued
--   job (`insert ... on conflict (repository_id) where state = 'queued' do update`); a new job can
--   queue while one runs, and a worker never claims it until the running one has ended.
-- * Workers hold a job by lease (locked_by, locked_until on the database clock) renewed by
--   heartbeat; a job whose lease expired is claimed again by any worker.
-- * event_seq numbers a job's events: appending an event increments it under the job's row
--   lock, so a worker and a CancelJob writing at once never take the same sequence.
-- * skips records the files a sync left out and why (capped per job; counts per reason are in
--   progress). It is part of the job row, so the job's row level security covers it.
-- * key_id is the API key that asked for the job, so its indexing volume is charged to that key
--   in public.token_usage (purpose 'indexing'; the unit is defined in the README).
-- * NOTIFY wakes the parts that wait, and is only a hint (they poll as the fallback): channel
--   `indexing_jobs` when a job becomes claimable (workers), channel `indexing_job_events` with
--   the job id when an event is appended (WatchJob). PostgreSQL folds identical notifications of
--   one transaction into one, so a transaction sends at most one per job, whatever it wrote.

alter table public.indexing_jobs add column if not exists event_seq integer not null default 0;
alter table public.indexing_jobs add column if not exists skips jsonb not null default '[]'::jsonb;
alter table public.indexing_jobs add column if not exists key_id uuid
  references public.api_keys (id) on delete set null;

-- user_id is redundant (a repository has one owner) but keeps another tenant's insert from
-- colliding with, and so learning about, the owner's job: it fails on the foreign key instead.
create unique index if not exists indexing_jobs_one_queued_per_repository_idx
  on public.indexing_jobs (repository_id, user_id) where state = 'queued';
create unique index if not exists indexing_jobs_one_running_per_repository_idx
  on public.indexing_jobs (repository_id, user_id) where state = 'running';
-- The claim order: priority first (higher sooner), then run time, then id.
drop index if exists public.indexing_jobs_dequeue_idx;
create index if not exists indexing_jobs_claim_idx
  on public.indexing_jobs (priority desc, run_after, id) where state = 'queued';
-- Pruning finished jobs after the retention period.
create index if not exists indexing_jobs_finished_at_idx
  on public.indexing_jobs (finished_at) where state in ('succeeded', 'failed', 'cancelled');
create index if not exists webhook_deliveries_received_at_idx
  on public.webhook_deliveries (received_at);

-- The event's kind (claimed, fetching, diffing, progress, finished, failed, ...); `state` is the
-- job's state after the event.
alter table public.indexing_job_events add column if not exists kind text not null default 'progress';

create or replace function public.indexing_jobs_notify()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if new.state = 'queued' then
    perform pg_catalog.pg_notify('indexing_jobs', '');
  end if;
  return null;
end;
$$;

create or replace function public.indexing_job_events_notify()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform pg_catalog.pg_notify('indexing_job_events', new.job_id::text);
  return null;
end;
$$;

revoke all on function public.indexing_jobs_notify() from public, anon, authenticated;
revoke all on function public.indexing_job_events_notify() from public, anon, authenticated;

create or replace trigger indexing_jobs_notify
  after insert or update of state, run_after on public.indexing_jobs
  for each row execute function public.indexing_jobs_notify();

create or replace trigger indexing_job_events_notify
  after insert on public.indexing_job_events
  for each row execute function public.indexing_job_events_notify();
