-- GitHub webhook deliveries get a processing status that follows the job they queued.
--
-- A verified delivery is recorded as 'received' and, in the same transaction, either queues a
-- job ('queued', job_id set) or is answered at once ('processed', with ignored_reason when it
-- caused nothing). From then on the job's own state drives the delivery's through the trigger
-- below: running → 'processing', queued again for a retry → 'queued', succeeded → 'processed',
-- failed or cancelled → 'failed' with the job's error. Workers therefore need no webhook bookkeeping, and a push that was coalesced into
-- an already queued job follows that job. Deliveries whose signature did not verify are never
-- stored (signature_valid stays for the rows written before this migration).

alter table public.webhook_deliveries
  add column if not exists status text not null default 'received',
  add column if not exists error jsonb,
  add column if not exists ignored_reason text,
  -- ref and after are the push's `ref` and new head (null for other events).
  add column if not exists ref text,
  add column if not exists after text,
  add column if not exists updated_at timestamptz not null default now();

alter table public.webhook_deliveries drop constraint if exists webhook_deliveries_status_check;
alter table public.webhook_deliveries add constraint webhook_deliveries_status_check
  check (status in ('received', 'queued', 'processing', 'processed', 'failed'));

alter table public.webhook_deliveries drop constraint if exists webhook_deliveries_ignored_reason_check;
alter table public.webhook_deliveries add constraint webhook_deliveries_ignored_reason_check
  check (ignored_reason is null or char_length(ignored_reason) <= 512);

create or replace trigger webhook_deliveries_set_updated_at
  before update on public.webhook_deliveries
  for each row execute function public.set_updated_at();

-- Repositories list by name; the page token is (full_name, id).
create index if not exists repositories_user_id_full_name_idx
  on public.repositories (user_id, full_name, id);

create or replace function public.webhook_deliveries_follow_job()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  next_status text;
begin
  next_status := case new.state
    -- A failed attempt waiting for its retry is queued again.
    when 'queued' then 'queued'
    when 'running' then 'processing'
    when 'succeeded' then 'processed'
    when 'failed' then 'failed'
    when 'cancelled' then 'failed'
    else null
  end;
  if next_status is null then
    return null;
  end if;
  update public.webhook_deliveries
     set status = next_status,
         error = case
           when new.state = 'failed' then new.error
           when new.state = 'cancelled' then pg_catalog.jsonb_build_object(
             'reason', 'JOB_CANCELLED', 'message', 'the job this delivery queued was cancelled')
           else null
         end
   where job_id = new.id
     and status is distinct from next_status
     and status not in ('processed', 'failed');
  return null;
end;
$$;

revoke all on function public.webhook_deliveries_follow_job() from public, anon, authenticated;

create or replace trigger indexing_jobs_webhook_deliveries
  after update of state on public.indexing_jobs
  for each row
  when (old.state is distinct from new.state)
  execute function public.webhook_deliveries_follow_job();
