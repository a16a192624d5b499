-- Document writers announce their tenant, so the search tailer waits only for its own tenant.
--
-- Revisions are drawn before commit, so the search service may only claim to cover revision R
-- for a tenant once no transaction still running can commit a row of that tenant at or below
-- R (services/search/tailer.py). Uncommitted rows are invisible to other sessions, so without
-- help a writer's tenant is unknown and every open document write would hold back every tenant.
-- Before drawing a revision, both triggers now take a shared transaction-level advisory lock
-- keyed (1262764611 'KDBC', hashtext(user_id)); pg_locks then shows which tenants each running
-- writer touches. Shared, so writers never wait for each other; transaction-level, so it works
-- through Supabase's transaction pooler and is released at commit or rollback.

create or replace function public.documents_stamp()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  -- Announce the tenant before the revision is drawn (see the header of this migration).
  perform pg_catalog.pg_advisory_xact_lock_shared(1262764611, pg_catalog.hashtext(new.user_id::text));
  new.revision := pg_catalog.nextval('public.document_revision_seq');
  -- Computed here rather than as a generated column: convert_to() is not immutable.
  new.content_hash := pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(new.content, 'UTF8')), 'hex');
  return new;
end;
$$;

create or replace function public.documents_record_change()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  changed public.documents;
  change_op text;
  change_revision bigint;
begin
  if tg_op = 'DELETE' then
    changed := old;
    change_op := 'delete';
    perform pg_catalog.pg_advisory_xact_lock_shared(1262764611, pg_catalog.hashtext(old.user_id::text));
    change_revision := pg_catalog.nextval('public.document_revision_seq');
  else
    changed := new;
    change_op := case when new.deleted_at is null then 'upsert' else 'delete' end;
    change_revision := new.revision;
  end if;
  insert into public.document_changes (revision, user_id, document_id, repository_id, path, op)
  values (change_revision, changed.user_id, changed.id, changed.repository_id, changed.path, change_op);
  -- Identical notifications in one transaction are folded into one, so a batch of writes for a
  -- tenant wakes listeners once.
  perform pg_catalog.pg_notify('document_changes', changed.user_id::text);
  return null;
end;
$$;

revoke all on function public.documents_stamp() from public, anon, authenticated;
revoke all on function public.documents_record_change() from public, anon, authenticated;
