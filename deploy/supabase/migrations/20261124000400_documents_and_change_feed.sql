-- Documents, the global document revision sequence, the change feed search tails, and symbols.
--
-- Every write to public.documents (insert, update, soft delete, hard delete) takes the next value
-- of public.document_revision_seq and appends one row to public.document_changes, so revisions
-- are unique and increase with every change. A delete leaves a tombstone row (op = 'delete').
-- The trigger also sends NOTIFY on channel `document_changes` with the tenant's user id as
-- payload; notifications are delivered at commit, and listeners then read the feed.
--
-- Revisions are taken at write time but transactions commit in any order, so a reader that
-- sees revision 12 may later see 11 appear. Each change row records its writer's transaction id
-- (xact_id); a tailer only advances its cursor past revisions whose transactions are older than
-- pg_snapshot_xmin(pg_current_snapshot()), i.e. certainly finished, and so never skips one.

create sequence if not exists public.document_revision_seq as bigint;

comment on sequence public.document_revision_seq is
  'Global, monotonically increasing revision for every document write (change feed order).';

create table if not exists public.documents (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  repository_id uuid,
  path text not null check (char_length(path) between 1 and 4096),
  language text,
  -- content is UTF-8 text: binary and invalid UTF-8 files are skipped at ingest, never stored.
  content text not null default '',
  size bigint generated always as (octet_length(content)) stored,
  -- content_hash (hex SHA-256 of the UTF-8 content) is stamped by documents_stamp below.
  content_hash text not null default '',
  metadata jsonb not null default '{}'::jsonb,
  revision bigint not null default 0,
  deleted_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint documents_user_id_repository_id_path_key unique nulls not distinct (user_id, repository_id, path),
  constraint documents_id_user_id_key unique (id, user_id),
  constraint documents_repository_fkey foreign key (repository_id, user_id)
    references public.repositories (id, user_id) on delete cascade
);

create index if not exists documents_user_id_revision_idx on public.documents (user_id, revision);
create index if not exists documents_user_id_path_idx on public.documents (user_id, path);
create index if not exists documents_repository_id_idx on public.documents (repository_id)
  where repository_id is not null;

comment on table public.documents is
  'Source documents (the truth the search index is built from); soft-deleted rows are tombstones.';

create or replace trigger documents_set_updated_at
  before update on public.documents
  for each row execute function public.set_updated_at();


create table if not exists public.document_changes (
  revision bigint primary key,
  -- No foreign keys: tombstones must outlive the documents (and users) they describe.
  user_id uuid not null,
  document_id uuid not null,
  repository_id uuid,
  path text not null,
  op text not null check (op in ('upsert', 'delete')),
  xact_id xid8 not null default pg_current_xact_id(),
  changed_at timestamptz not null default now()
);

create index if not exists document_changes_user_id_revision_idx
  on public.document_changes (user_id, revision);

comment on table public.document_changes is
  'Change feed: one row per document write in revision order, deletes as tombstones.';


-- Both trigger functions are security definer so that users writing their own documents need no
-- privilege on the sequence or the change feed; search_path is empty and every name qualified.
create or replace function public.documents_stamp()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
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

create or replace trigger documents_stamp
  before insert or update on public.documents
  for each row execute function public.documents_stamp();

create or replace trigger documents_record_change
  after insert or update or delete on public.documents
  for each row execute function public.documents_record_change();


alter table public.documents enable row level security;
alter table public.documents force row level security;
drop policy if exists documents_owner on public.documents;
create policy documents_owner on public.documents
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.documents from public, anon, authenticated;
grant select, insert, update, delete on table public.documents to service_role, authenticated;

-- Not forced: rows are written by the definer trigger above as the table owner, which on
-- Supabase is not guaranteed to bypass row level security.
alter table public.document_changes enable row level security;
drop policy if exists document_changes_owner on public.document_changes;
create policy document_changes_owner on public.document_changes
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.document_changes from public, anon, authenticated;
grant select, insert, update, delete on table public.document_changes to service_role;
grant select on table public.document_changes to authenticated;
revoke all on sequence public.document_revision_seq from public, anon, authenticated;
grant usage, select on sequence public.document_revision_seq to service_role;


create table if not exists public.symbols (
  id bigint generated always as identity primary key,
  document_id uuid not null,
  user_id uuid not null references auth.users (id) on delete cascade,
  name text not null,
  kind text not null,
  qualified_name text,
  -- Lines are 1-based and inclusive; columns are 0-based UTF-8 byte offsets within the line.
  start_line integer not null check (start_line > 0),
  start_column integer not null default 0 check (start_column >= 0),
  end_line integer not null,
  end_column integer not null default 0 check (end_column >= 0),
  signature text,
  parent text,
  constraint symbols_lines_check check (end_line >= start_line),
  constraint symbols_document_fkey foreign key (document_id, user_id)
    references public.documents (id, user_id) on delete cascade
);

create index if not exists symbols_document_id_idx on public.symbols (document_id);
-- Prefix and exact lookups by name within a tenant.
create index if not exists symbols_user_id_name_idx on public.symbols (user_id, name text_pattern_ops);
create index if not exists symbols_user_id_lower_name_idx
  on public.symbols (user_id, lower(name) text_pattern_ops);

comment on table public.symbols is
  'Tree-sitter symbols (definitions) extracted from documents, for symbol search.';

alter table public.symbols enable row level security;
alter table public.symbols force row level security;
drop policy if exists symbols_owner on public.symbols;
create policy symbols_owner on public.symbols
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.symbols from public, anon, authenticated;
grant select, insert, update, delete on table public.symbols to service_role, authenticated;

grant usage, select on all sequences in schema public to service_role;
grant usage, select on sequence public.symbols_id_seq to authenticated;
