-- Admission leases: auth replicas reserve small blocks of a key's rate-limit window (and of its
-- monthly quota) and admit requests from memory until the block is spent, so a check costs no
-- database round trip in the common case. The guarantee of 20261124100000_key_admission.sql is
-- kept:
--
-- * Never more than the limit. A block is granted under the key's row lock and is counted in the
--   window's `count` and the key's `usage_count` at once, exactly as admitted requests were.
-- * Exactly the limit when demand exceeds it. Tokens a replica holds and does not use go back
--   (public.settle_api_key_leases subtracts them again). A replica refuses only when the database
--   says nothing is left to grant *and* no other replica holds unused tokens for that window;
--   when another one does, the grant function sends NOTIFY api_key_lease_reclaim and the
--   asking replica retries while the holders hand their tokens back. A holder that crashed
--   never hands back: its lease expires (expires_at, on the database clock) and its tokens
--   count as used, which is the only way a lease can lose admissions.
--
-- A replica uses a lease only before its own conservative deadline (the time it sent the
-- request plus the TTL, minus a margin), which is never later than expires_at here.

create table if not exists public.admission_leases (
  key_id uuid not null references public.api_keys (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,
  window_start timestamptz not null,
  -- holder names one auth process (host, pid and a random suffix).
  holder text not null check (length(holder) between 1 and 200),
  -- tokens: unused requests the holder had reserved when it last spoke to the database.
  tokens integer not null check (tokens >= 0),
  expires_at timestamptz not null,
  primary key (key_id, window_start, holder)
);

create index if not exists admission_leases_expires_at_idx on public.admission_leases (expires_at);

comment on table public.admission_leases is
  'Blocks of a key''s rate window and quota reserved by one auth replica; unused tokens are returned.';

alter table public.admission_leases enable row level security;
alter table public.admission_leases force row level security;
drop policy if exists admission_leases_owner on public.admission_leases;
create policy admission_leases_owner on public.admission_leases
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.admission_leases from public, anon, authenticated;
grant select, insert, update, delete on table public.admission_leases to service_role;
grant select on table public.admission_leases to authenticated;


-- public.lease_api_key_requests grants one holder up to p_want more tokens of a key's current
-- window and month. p_need is what the holder's waiting checks need now; more (up to p_want) is
-- granted only while at least four times as much stays available, so blocks shrink to the
-- demand as the window runs out. p_keep is how many unused tokens the holder still has from
-- earlier grants in this window (the rest of its previous block was used). Returns the grant, the
-- window count and usage after it, the limits, whether the key is revoked, and how many unused
-- tokens other live holders of this window have reserved.
create or replace function public.lease_api_key_requests(
  p_key_id uuid,
  p_holder text,
  p_keep integer,
  p_need integer,
  p_want integer,
  p_window_start timestamptz,
  p_month date,
  p_now timestamptz,
  p_ttl_ms integer
)
returns table (
  granted integer,
  window_count integer,
  rate_limit integer,
  usage_count bigint,
  monthly_quota bigint,
  revoked boolean,
  held_elsewhere integer
)
language plpgsql
volatile
set search_path = ''
set role = 'service_role'
as $$
declare
  key_row record;
  month_used bigint;
  counted integer;
  available bigint;
  allowed integer;
  others integer;
  kept integer := greatest(coalesce(p_keep, 0), 0);
begin
  select k.user_id, k.rate_limit, k.monthly_quota, k.usage_count, k.usage_period, k.revoked_at
    into key_row
    from public.api_keys k
    where k.id = p_key_id
    for update;
  if not found then
    return;
  end if;
  -- Leases nobody renewed or returned in time belong to holders that stopped: their tokens
  -- stay counted as used.
  delete from public.admission_leases l
    where l.key_id = p_key_id and l.expires_at <= pg_catalog.clock_timestamp();
  month_used := case when key_row.usage_period < p_month then 0 else key_row.usage_count end;
  select w.count into counted
    from public.rate_limit_windows w
    where w.key_id = p_key_id and w.window_start = p_window_start;
  counted := coalesce(counted, 0);
  if key_row.revoked_at is not null or p_need <= 0 then
    allowed := 0;
  else
    available := greatest(0, least(key_row.rate_limit - counted, key_row.monthly_quota - month_used));
    allowed := least(available, greatest(p_need, least(p_want, available / 4)))::integer;
  end if;
  select coalesce(sum(l.tokens), 0)::integer into others
    from public.admission_leases l
    where l.key_id = p_key_id and l.window_start = p_window_start and l.holder <> p_holder
      and l.tokens > 0;
  if allowed > 0 then
    insert into public.rate_limit_windows as w (key_id, user_id, window_start, count)
      values (p_key_id, key_row.user_id, p_window_start, allowed)
      on conflict (key_id, window_start) do update set count = w.count + excluded.count;
    update public.api_keys k
      set usage_count = month_used + allowed,
          usage_period = greatest(k.usage_period, p_month),
          last_used_at = greatest(k.last_used_at, p_now)
      where k.id = p_key_id;
  elsif others > 0 and key_row.revoked_at is null then
    -- Nothing left to grant but others hold unused tokens: ask them to hand them back.
    perform pg_catalog.pg_notify('api_key_lease_reclaim', p_key_id::text);
  end if;
  if kept + allowed > 0 then
    insert into public.admission_leases as l (key_id, user_id, window_start, holder, tokens, expires_at)
      values (p_key_id, key_row.user_id, p_window_start, p_holder, kept + allowed,
              pg_catalog.clock_timestamp() + make_interval(secs => p_ttl_ms / 1000.0))
      on conflict (key_id, window_start, holder)
      do update set tokens = excluded.tokens, expires_at = excluded.expires_at;
  else
    delete from public.admission_leases l
      where l.key_id = p_key_id and l.window_start = p_window_start and l.holder = p_holder;
  end if;
  return query select allowed, counted + allowed, key_row.rate_limit, month_used + allowed,
    key_row.monthly_quota, key_row.revoked_at is not null, others;
end;
$$;

comment on function public.lease_api_key_requests(uuid, text, integer, integer, integer, timestamptz, date, timestamptz, integer) is
  'Reserves a block of an API key''s rate window and monthly quota for one auth replica, exactly.';

revoke all on function public.lease_api_key_requests(uuid, text, integer, integer, integer, timestamptz, date, timestamptz, integer)
  from public, anon, authenticated;
grant execute on function public.lease_api_key_requests(uuid, text, integer, integer, integer, timestamptz, date, timestamptz, integer)
  to service_role;


-- public.settle_api_key_lease ends one holder's lease of a key's window: the p_unused tokens it
-- did not use are subtracted from the window count and, if the key is still counting that
-- month, from usage_count; the lease row is deleted.
create or replace function public.settle_api_key_lease(
  p_key_id uuid,
  p_holder text,
  p_window_start timestamptz,
  p_month date,
  p_unused integer
)
returns void
language plpgsql
volatile
set search_path = ''
set role = 'service_role'
as $$
begin
  perform 1 from public.api_keys k where k.id = p_key_id for update;
  if not found then
    return;
  end if;
  delete from public.admission_leases l
    where l.key_id = p_key_id and l.window_start = p_window_start and l.holder = p_holder;
  if p_unused > 0 then
    update public.rate_limit_windows w
      set count = greatest(0, w.count - p_unused)
      where w.key_id = p_key_id and w.window_start = p_window_start;
    update public.api_keys k
      set usage_count = greatest(0, k.usage_count - p_unused)
      where k.id = p_key_id and k.usage_period = p_month;
  end if;
end;
$$;

comment on function public.settle_api_key_lease(uuid, text, timestamptz, date, integer) is
  'Returns the unused tokens of one auth replica''s admission lease and ends the lease.';

revoke all on function public.settle_api_key_lease(uuid, text, timestamptz, date, integer)
  from public, anon, authenticated;
grant execute on function public.settle_api_key_lease(uuid, text, timestamptz, date, integer)
  to service_role;
