-- Idempotent key creation and rotation (services/auth/management.py).
--
-- CreateApiKey and RotateApiKey accept a client-chosen request_id (Google AIP-155). The auth
-- service keeps it in api_keys.metadata ->> 'request_id' and looks it up on a retry. This unique
-- index makes that exact under concurrency: two simultaneous requests with the same id cannot
-- both insert a key; the loser's insert fails and it returns the winner's key instead. The id
-- is scoped per user, so one tenant's ids never collide with another's.

create unique index if not exists api_keys_user_id_request_id_key
  on public.api_keys (user_id, (metadata ->> 'request_id'))
  where metadata ? 'request_id';

comment on index public.api_keys_user_id_request_id_key is
  'One key per (user, request_id): retried CreateApiKey/RotateApiKey calls find the first result.';
