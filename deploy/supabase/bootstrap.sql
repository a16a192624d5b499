-- Supabase compatibility bootstrap.
--
-- The migrations assume what every Supabase project provides: the API roles, the `auth` schema
-- with `auth.users`, and the `auth.uid()` / `auth.role()` / `auth.jwt()` helpers that read the
-- JWT claims PostgREST puts into transaction-local settings. On plain PostgreSQL (the embedded
-- dev/test cluster, CI) this file creates them. Every statement only creates or grants what is
-- missing, so on a real Supabase project (where the connecting `postgres` role may not even be
-- allowed to alter these objects) the whole file changes nothing.
--
-- It is kept apart from migrations/ on purpose: `supabase db push` must never replay it.
-- `services/common/migrate.py` runs it in one transaction under an advisory lock.

-- Roles -----------------------------------------------------------------------------------------

do $bootstrap$
begin
  if not exists (select from pg_catalog.pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select from pg_catalog.pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select from pg_catalog.pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
  if not exists (select from pg_catalog.pg_roles where rolname = 'authenticator') then
    create role authenticator login noinherit;
  end if;
  -- Supabase's auth server owns auth.users through this role; owning the table with a role
  -- other than the migrating superuser reproduces the foreign-key permission path of Supabase.
  if not exists (select from pg_catalog.pg_roles where rolname = 'supabase_auth_admin') then
    create role supabase_auth_admin nologin noinherit;
  end if;
end
$bootstrap$;

-- authenticator switches into the API roles (`set role`), exactly as PostgREST does.
do $bootstrap$
declare
  api_role text;
begin
  foreach api_role in array array['anon', 'authenticated', 'service_role'] loop
    if not pg_catalog.pg_has_role('authenticator', api_role, 'member') then
      execute pg_catalog.format('grant %I to authenticator', api_role);
    end if;
    -- The connecting role (our superuser locally, `postgres` on Supabase) must be able to
    -- `set_config('role', ...)` into each API role inside a transaction.
    if not pg_catalog.pg_has_role(current_user, api_role, 'member')
       and not (select rolsuper from pg_catalog.pg_roles where rolname = current_user) then
      execute pg_catalog.format('grant %I to %I', api_role, current_user);
    end if;
  end loop;
end
$bootstrap$;

-- Schema auth and auth.users --------------------------------------------------------------------

do $bootstrap$
begin
  if not exists (select from pg_catalog.pg_namespace where nspname = 'auth') then
    create schema auth authorization supabase_auth_admin;
  end if;
end
$bootstrap$;

do $bootstrap$
begin
  if pg_catalog.to_regclass('auth.users') is null then
    -- A minimal subset of Supabase's auth.users: the columns KotaDB reads.
    create table auth.users (
      id uuid primary key,
      aud varchar(255),
      role varchar(255),
      email varchar(255),
      raw_app_meta_data jsonb not null default '{}'::jsonb,
      raw_user_meta_data jsonb not null default '{}'::jsonb,
      is_anonymous boolean not null default false,
      created_at timestamptz not null default pg_catalog.now(),
      updated_at timestamptz not null default pg_catalog.now(),
      deleted_at timestamptz
    );
    create unique index users_email_key on auth.users (email) where email is not null;
    comment on table auth.users is
      'Compatibility stand-in for Supabase Auth users (created by deploy/supabase/bootstrap.sql).';
    alter table auth.users owner to supabase_auth_admin;
  end if;
end
$bootstrap$;

-- Foreign keys into auth.users are checked with the privileges of the table's owner, which
-- therefore needs USAGE on schema auth; the API roles need it to call auth.uid() in policies.
do $bootstrap$
declare
  grantee text;
  users_owner text;
begin
  select pg_catalog.pg_get_userbyid(c.relowner) into users_owner
    from pg_catalog.pg_class c
    join pg_catalog.pg_namespace n on n.oid = c.relnamespace
   where n.nspname = 'auth' and c.relname = 'users';
  foreach grantee in array array['anon', 'authenticated', 'service_role', users_owner] loop
    if grantee is not null and not pg_catalog.has_schema_privilege(grantee, 'auth', 'USAGE') then
      execute pg_catalog.format('grant usage on schema auth to %I', grantee);
    end if;
  end loop;
end
$bootstrap$;

-- JWT claim helpers -----------------------------------------------------------------------------
-- Supabase's definitions read the legacy per-claim setting (`request.jwt.claim.<name>`, set by
-- PostgREST < 9) first and fall back to the `request.jwt.claims` JSON document that current
-- PostgREST sets transaction-locally. Both settings are read with missing_ok, so outside a
-- request every helper returns NULL.

do $bootstrap$
begin
  if pg_catalog.to_regprocedure('auth.uid()') is null then
    create function auth.uid() returns uuid
      language sql stable
      as $fn$
        select coalesce(
          nullif(pg_catalog.current_setting('request.jwt.claim.sub', true), ''),
          (nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb
            operator(pg_catalog.->>) 'sub')
        )::uuid
      $fn$;
    comment on function auth.uid() is 'The calling user id: the sub claim of the request JWT.';
  end if;

  if pg_catalog.to_regprocedure('auth.role()') is null then
    create function auth.role() returns text
      language sql stable
      as $fn$
        select coalesce(
          nullif(pg_catalog.current_setting('request.jwt.claim.role', true), ''),
          (nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb
            operator(pg_catalog.->>) 'role')
        )::text
      $fn$;
    comment on function auth.role() is 'The role claim of the request JWT.';
  end if;

  if pg_catalog.to_regprocedure('auth.jwt()') is null then
    create function auth.jwt() returns jsonb
      language sql stable
      as $fn$
        select coalesce(
          nullif(pg_catalog.current_setting('request.jwt.claim', true), ''),
          nullif(pg_catalog.current_setting('request.jwt.claims', true), '')
        )::jsonb
      $fn$;
    comment on function auth.jwt() is 'All claims of the request JWT as jsonb.';
  end if;
end
$bootstrap$;

do $bootstrap$
declare
  fn text;
  api_role text;
begin
  foreach fn in array array['auth.uid()', 'auth.role()', 'auth.jwt()'] loop
    foreach api_role in array array['anon', 'authenticated', 'service_role'] loop
      if not pg_catalog.has_function_privilege(api_role, fn, 'EXECUTE') then
        execute pg_catalog.format('grant execute on function %s to %I', fn, api_role);
      end if;
    end loop;
  end loop;
end
$bootstrap$;
