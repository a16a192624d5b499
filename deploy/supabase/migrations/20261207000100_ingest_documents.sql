-- What the document RPCs of the ingest service need beyond 20261124000400 (services/ingest/documents.py).
--
-- * documents.title and documents.tags (sorted, distinct; a GIN index serves the ListDocuments
--   tag filter), and documents.index_skip / index_skip_detail: why the search engine will not
--   index the content (too large for it, too many distinct trigrams, empty), decided at ingest
--   from the engine's default limits; the search service reports the skip with its reason.
-- * documents (user_id, path, id): ListDocuments pages by keyset on (path, id).
-- * symbols.name_start_byte / name_end_byte: the byte range of the symbol's name in the
--   document, so that a search rebuild restores the engine's symbols without re-parsing.
-- * ingest_requests: the first answer to an ingest write carrying a request_id, so that a retry
--   returns it and writes nothing new. The row is inserted before the write, in the same
--   transaction, so a concurrent retry waits on its primary key and then reads the answer.
--   Rows older than the retention setting are ignored and pruned.

alter table public.documents add column if not exists title text
  check (title is null or char_length(title) between 1 and 512);
alter table public.documents add column if not exists tags text[] not null default '{}'
  check (cardinality(tags) <= 256);
alter table public.documents add column if not exists index_skip text
  check (index_skip is null or index_skip in ('empty', 'too_large', 'too_many_trigrams'));
alter table public.documents add column if not exists index_skip_detail text;

create index if not exists documents_tags_idx on public.documents using gin (tags);
create index if not exists documents_user_id_path_id_idx on public.documents (user_id, path, id);

comment on column public.documents.tags is 'Client tags, sorted and distinct (ListDocuments filters on one).';
comment on column public.documents.index_skip is
  'Why the search engine skips the content (stored all the same); null when it is indexable.';

alter table public.symbols add column if not exists name_start_byte integer not null default 0
  check (name_start_byte >= 0);
alter table public.symbols add column if not exists name_end_byte integer not null default 0
  check (name_end_byte >= name_start_byte);


create table if not exists public.ingest_requests (
  user_id uuid not null references auth.users (id) on delete cascade,
  -- method names the RPC (and, for streams, the batch), so ids never collide across methods.
  method text not null check (char_length(method) between 1 and 128),
  request_id text not null check (char_length(request_id) between 1 and 128),
  -- fingerprint is a hash of the request, to refuse one id reused for a different request.
  fingerprint text not null,
  -- response is the first answer (JSON), set before the transaction that made it commits.
  response jsonb,
  created_at timestamptz not null default now(),
  primary key (user_id, method, request_id)
);

create index if not exists ingest_requests_user_id_created_at_idx
  on public.ingest_requests (user_id, created_at);
create index if not exists ingest_requests_created_at_idx on public.ingest_requests (created_at);

comment on table public.ingest_requests is
  'First answers to ingest writes carrying a request_id (idempotent retries), kept for a retention period.';

alter table public.ingest_requests enable row level security;
alter table public.ingest_requests force row level security;
drop policy if exists ingest_requests_owner on public.ingest_requests;
create policy ingest_requests_owner on public.ingest_requests
  for all to authenticated
  using (user_id = (select auth.uid()))
  with check (user_id = (select auth.uid()));

revoke all on table public.ingest_requests from public, anon, authenticated;
grant select, insert, update, delete on table public.ingest_requests to service_role, authenticated;
