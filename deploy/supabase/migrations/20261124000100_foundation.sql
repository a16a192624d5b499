-- Foundation: shared trigger functions and schema privileges every later migration relies on.
--
-- Conventions for every user-scoped table in schema public (checked by tests/database):
--   * a `user_id uuid not null` column referencing auth.users(id), denormalised onto child tables
--     so each policy is a plain `user_id = auth.uid()` and composite foreign keys
--     `(parent_id, user_id)` keep a child in its parent's tenant;
--   * row level security enabled (and forced, so even the owning role is filtered unless it
--     bypasses RLS) with one policy for `authenticated` carrying both USING and WITH CHECK;
--   * explicit grants: `service_role` gets the table, `authenticated` gets exactly what a user may
--     do through PostgREST with their own JWT, `anon` gets nothing (older Supabase projects grant
--     new public tables to the API roles by default, so the grants start with a revoke);
--   * an `updated_at` trigger where the table has `updated_at`, and a `comment on table`.

grant usage on schema public to authenticated, service_role;

create or replace function public.set_updated_at()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := pg_catalog.now();
  return new;
end;
$$;

comment on function public.set_updated_at() is
  'Trigger function: stamps updated_at with the transaction time on every update.';

-- Trigger functions are never called directly; keep them away from the API roles.
revoke all on function public.set_updated_at() from public, anon, authenticated;
