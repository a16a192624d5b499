-- Exact request admission for API keys: per-minute rate limit and monthly quota in one call,
-- plus change notifications so every auth replica drops cached keys at once.
--
-- public.admit_api_key_requests(key, n, window, month, now) grants up to n requests to one key
-- and returns how many it granted. It first locks the key's api_keys row, which serializes every
-- admission for that key across all auth replicas and connections; each later statement in the
-- function takes a fresh snapshot (READ COMMITTED, volatile function), so it sees every grant
-- committed before the lock was obtained. Hence the count of a window never exceeds the key's
-- rate_limit, usage_count never exceeds monthly_quota, and when demand exceeds the limit exactly
-- the limit is granted: nothing is lost to races. Callers may ask for several requests at once
-- (the auth service coalesces concurrent checks of one key into one call). A key that does not
-- exist yields no row; a revoked key is granted nothing.

create or replace function public.admit_api_key_requests(
  p_key_id uuid,
  p_requested integer,
  p_window_start timestamptz,
  p_month date,
  p_now timestamptz
)
returns table (
  granted integer,
  window_count integer,
  rate_limit integer,
  usage_count bigint,
  monthly_quota bigint,
  revoked boolean
)
language plpgsql
volatile
set search_path = ''
-- Runs as service_role (BYPASSRLS) whoever calls it, in one statement, so the auth service needs
-- no transaction around it: one round trip per admission. Setting the role at entry still
-- requires the caller to be a member of service_role; execute is granted to no API role.
set role = 'service_role'
as $$
declare
  key_row record;
  month_used bigint;
  counted integer;
  allowed integer;
begin
  select k.user_id, k.rate_limit, k.monthly_quota, k.usage_count, k.usage_period, k.revoked_at
    into key_row
    from public.api_keys k
    where k.id = p_key_id
    for update;
  if not found then
    return;
  end if;
  -- A new month starts from zero. A replica whose clock lags behind the stored period counts
  -- against the newer month rather than resetting it.
  month_used := case when key_row.usage_period < p_month then 0 else key_row.usage_count end;
  select w.count into counted
    from public.rate_limit_windows w
    where w.key_id = p_key_id and w.window_start = p_window_start;
  counted := coalesce(counted, 0);
  if key_row.revoked_at is not null or p_requested <= 0 then
    allowed := 0;
  else
    allowed := greatest(
      0, least(p_requested::bigint, key_row.rate_limit - counted, key_row.monthly_quota - month_used)
    )::integer;
  end if;
  if allowed > 0 then
    insert into public.rate_limit_windows as w (key_id, user_id, window_start, count)
      values (p_key_id, key_row.user_id, p_window_start, allowed)
      on conflict (key_id, window_start) do update set count = w.count + excluded.count;
    update public.api_keys k
      set usage_count = month_used + allowed,
          usage_period = greatest(k.usage_period, p_month),
          last_used_at = greatest(k.last_used_at, p_now)
      where k.id = p_key_id;
  end if;
  return query select allowed, counted + allowed, key_row.rate_limit, month_used + allowed,
    key_row.monthly_quota, key_row.revoked_at is not null;
end;
$$;

comment on function public.admit_api_key_requests(uuid, integer, timestamptz, date, timestamptz) is
  'Grants up to n requests to an API key within its per-minute rate limit and monthly quota, exactly.';

revoke all on function public.admit_api_key_requests(uuid, integer, timestamptz, date, timestamptz)
  from public, anon, authenticated;
grant execute on function public.admit_api_key_requests(uuid, integer, timestamptz, date, timestamptz)
  to service_role;


-- public.find_api_key(hash) is the auth service's lookup of a presented key, by the SHA-256 of
-- the whole secret. Like the admission function it runs as service_role in one statement.
create or replace function public.find_api_key(p_key_hash text)
returns table (
  id uuid,
  user_id uuid,
  permissions text[],
  rate_limit integer,
  monthly_quota bigint,
  expires_at timestamptz,
  revoked_at timestamptz,
  grace_until timestamptz
)
language sql
stable
set search_path = ''
set role = 'service_role'
as $$
  select k.id, k.user_id, k.permissions, k.rate_limit, k.monthly_quota, k.expires_at, k.revoked_at,
         k.grace_until
  from public.api_keys k
  where k.key_hash = p_key_hash;
$$;

comment on function public.find_api_key(text) is
  'Looks up an API key by the SHA-256 of its secret, for the auth service''s Check.';

revoke all on function public.find_api_key(text) from public, anon, authenticated;
grant execute on function public.find_api_key(text) to service_role;


-- Counting a request must not look like an edit of the key: updated_at (the API's update_time)
-- moves only when something other than the usage counters changes.
create or replace trigger api_keys_set_updated_at
  before update on public.api_keys
  for each row
  when (
    row(old.user_id, old.name, old.key_prefix, old.key_hash, old.permissions, old.rate_limit,
        old.monthly_quota, old.expires_at, old.revoked_at, old.rotated_from, old.grace_until,
        old.metadata)
    is distinct from
    row(new.user_id, new.name, new.key_prefix, new.key_hash, new.permissions, new.rate_limit,
        new.monthly_quota, new.expires_at, new.revoked_at, new.rotated_from, new.grace_until,
        new.metadata)
  )
  execute function public.set_updated_at();


-- Every change that matters to authentication (revoke, rotate, new limits, permissions, expiry,
-- deletion) is announced on channel api_key_changes with the key's id, whichever code made it,
-- so auth replicas evict their cached copy within milliseconds. Usage counting is not announced.
create or replace function public.notify_api_key_change()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform pg_catalog.pg_notify('api_key_changes', old.id::text);
  return null;
end;
$$;

comment on function public.notify_api_key_change() is
  'Trigger function: NOTIFY api_key_changes with the id of a changed or deleted API key.';

revoke all on function public.notify_api_key_change() from public, anon, authenticated;

create or replace trigger api_keys_notify_change
  after update on public.api_keys
  for each row
  when (
    row(old.user_id, old.key_hash, old.permissions, old.rate_limit, old.monthly_quota,
        old.expires_at, old.revoked_at, old.grace_until)
    is distinct from
    row(new.user_id, new.key_hash, new.permissions, new.rate_limit, new.monthly_quota,
        new.expires_at, new.revoked_at, new.grace_until)
  )
  execute function public.notify_api_key_change();

create or replace trigger api_keys_notify_delete
  after delete on public.api_keys
  for each row
  execute function public.notify_api_key_change();
