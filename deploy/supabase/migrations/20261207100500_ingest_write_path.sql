-- A cheaper write path for document batches (issue 11's bulk push target): what every stored
-- symbol and document paid for without anything reading it.
--
-- * symbols_user_id_fkey goes: a symbol already references (document_id, user_id) in
--   public.documents, whose user_id references auth.users, so the user is checked through the
--   document, and deleting a user still cascades (users -> documents -> symbols). The second
--   check cost one more referential-integrity lookup per symbol row, ~13 µs each, a third of a
--   batch's symbol insert.
-- * symbols_user_id_name_idx and symbols_user_id_lower_name_idx go: symbol search runs on the
--   search engine's in-memory symbol tables (services/search/engine/symsearch.py); the only
--   queries on public.symbols select or delete by document (symbols_document_id_idx). Each
--   index was two more B-tree insertions per symbol (one with lower() evaluated).
-- * documents_user_id_path_idx goes: documents_user_id_path_id_idx (user_id, path, id) serves
--   every query it served, as its leading columns.
-- * documents.content is compressed with lz4 where the server has it (Supabase and Debian builds
--   do): pglz compresses several times slower than lz4, and the content of every pushed file
--   larger than ~2 kB passes through it. Rows already stored keep their pglz values.

alter table public.symbols drop constraint if exists symbols_user_id_fkey;
drop index if exists public.symbols_user_id_name_idx;
drop index if exists public.symbols_user_id_lower_name_idx;
drop index if exists public.documents_user_id_path_idx;

do $$
begin
  if exists (
    select 1 from pg_catalog.pg_settings
    where name = 'default_toast_compression' and 'lz4' = any(enumvals)
  ) then
    alter table public.documents alter column content set compression lz4;
  end if;
end;
$$;
