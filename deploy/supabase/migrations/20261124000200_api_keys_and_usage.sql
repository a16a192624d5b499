-- API keys, usage metering, token accounting and exact per-minute rate-limit windows.

create table if not exists public.api_keys (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  name text not null check (char_length(name) between 1 and 200),
  -- key_prefix is the non-secret start of the key, shown in listings so users can tell keys apart.
  key_prefix text not null check (char_length(key_prefix) between 4 and 64),
  -- key_hash is a hash of the whole secret; the plaintext is shown once and never stored.
  key_hash text not null,
  permissions text[] not null default array['read']::text[]
    check (cardinality(permissions) > 0 and permissions <@ array['read', 'write', 'admin']::text[]),
  rate_limit integer not null default 60 check (rate_limit > 0),
  monthly_quota bigint not null default 100000 check (monthly_quota >= 0),
  -- usage_count counts requests in the calendar month (UTC) starting on usage_period.
  usage_count bigint not null default 0 check (usage_count >= 0),
  usage_period date not null default (date_trunc('month', now() at time zone 'utc'))::date,
  last_used_at timestamptz,
  expires_at timestamptz,
  revoked_at timestamptz,
  rotated_from uuid references public.api_keys (id) on delete set null,
  -- grace_until lets the key a rotation replaced keep working for a short overlap.
  grace_until timestamptz,
  metadata jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint api_keys_key_hash_key unique (key_hash),
  constraint api_keys_id_user_id_key unique (id, user_id)
);

create index if not exists api_keys_user_id_created_at_idx on public.api_keys (user_id, created_at desc);
create index if not exists api_keys_rotated_from_idx on public.api_keys (rotated_from)
  where rotated_from is not null;

comment on table public.api_keys is
  'API keys: hashed secrets with permissions, per-minute rate limit and monthly quota.';

create or replace trigger api_keys_set_updated_at
  before update on public.api_keys
  for each row execute function public.set_updated_at();

alter table public.api_keys enable row level security;
alter table public.api_keys force row level security;
drop policy if exists api_keys_owner on public.api_keys;
create policy api_keys_owner on public.api_keys
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.api_keys from public, anon, authenticated;
grant select, insert, update, delete on table public.api_keys to service_role;
-- Users may create, rename and revoke their own keys, but limits, quota and usage counters are
-- written by the auth service only (otherwise a user could raise their own quota via PostgREST).
grant select on table public.api_keys to authenticated;
grant insert (id, user_id, name, key_prefix, key_hash, permissions, expires_at, rotated_from,
              grace_until, metadata)
  on table public.api_keys to authenticated;
grant update (name, revoked_at, grace_until, metadata) on table public.api_keys to authenticated;


create table if not exists public.usage_metrics (
  id bigint generated always as identity primary key,
  key_id uuid references public.api_keys (id) on delete set null,
  user_id uuid not null references auth.users (id) on delete cascade,
  endpoint text not null,
  method text not null,
  status_code integer not null check (status_code between 0 and 999),
  response_time_ms integer check (response_time_ms >= 0),
  request_id text,
  occurred_at timestamptz not null default now()
);

create index if not exists usage_metrics_user_id_occurred_at_idx
  on public.usage_metrics (user_id, occurred_at desc);
create index if not exists usage_metrics_key_id_occurred_at_idx
  on public.usage_metrics (key_id, occurred_at desc) where key_id is not null;

comment on table public.usage_metrics is
  'One row per metered API request: key, endpoint, method, status and latency.';

alter table public.usage_metrics enable row level security;
alter table public.usage_metrics force row level security;
drop policy if exists usage_metrics_owner on public.usage_metrics;
create policy usage_metrics_owner on public.usage_metrics
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.usage_metrics from public, anon, authenticated;
grant select, insert, update, delete on table public.usage_metrics to service_role;
grant select on table public.usage_metrics to authenticated;


create table if not exists public.token_usage (
  id bigint generated always as identity primary key,
  user_id uuid not null references auth.users (id) on delete cascade,
  key_id uuid references public.api_keys (id) on delete set null,
  tokens bigint not null check (tokens >= 0),
  model text,
  purpose text not null default 'search',
  occurred_at timestamptz not null default now()
);

create index if not exists token_usage_user_id_occurred_at_idx
  on public.token_usage (user_id, occurred_at desc);
create index if not exists token_usage_key_id_occurred_at_idx
  on public.token_usage (key_id, occurred_at desc) where key_id is not null;

comment on table public.token_usage is
  'Token accounting per user and key (e.g. tokens returned to LLM clients), by model and purpose.';

alter table public.token_usage enable row level security;
alter table public.token_usage force row level security;
drop policy if exists token_usage_owner on public.token_usage;
create policy token_usage_owner on public.token_usage
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.token_usage from public, anon, authenticated;
grant select, insert, update, delete on table public.token_usage to service_role;
grant select on table public.token_usage to authenticated;


create table if not exists public.rate_limit_windows (
  key_id uuid not null references public.api_keys (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,
  -- window_start is the UTC minute the count belongs to (date_trunc('minute', ...)).
  window_start timestamptz not null,
  count integer not null default 0 check (count >= 0),
  primary key (key_id, window_start)
);

-- Old windows are pruned by time; the primary key already serves the hot path.
create index if not exists rate_limit_windows_window_start_idx on public.rate_limit_windows (window_start);

comment on table public.rate_limit_windows is
  'Exact per-key request counts per UTC minute, incremented atomically by the auth service.';

alter table public.rate_limit_windows enable row level security;
alter table public.rate_limit_windows force row level security;
drop policy if exists rate_limit_windows_owner on public.rate_limit_windows;
create policy rate_limit_windows_owner on public.rate_limit_windows
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.rate_limit_windows from public, anon, authenticated;
grant select, insert, update, delete on table public.rate_limit_windows to service_role;
grant select on table public.rate_limit_windows to authenticated;

grant usage, select on all sequences in schema public to service_role;
