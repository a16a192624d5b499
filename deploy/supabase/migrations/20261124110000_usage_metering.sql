-- Usage metering from Envoy's gRPC access log (services/auth/metering.py).
--
-- The auth process receives one access-log entry per request Envoy finished and writes the
-- admitted ones to public.usage_metrics in batches. Two additions make that exact:
--
-- * grpc_status: a native gRPC call answers HTTP 200 even when it fails; the outcome is in the
--   grpc-status trailer (or header, for trailers-only replies). status_code alone would count
--   every failed gRPC call as a success.
-- * A unique (request_id, occurred_at) index: Envoy never resends an access-log entry (its stream
--   has no acknowledgements), but the batch writer retries a batch whose commit outcome it could
--   not learn (connection lost during COMMIT). The retry inserts with `on conflict do nothing`,
--   so such a batch is written once. occurred_at (Envoy's start time, microseconds) is part of
--   the key so that a client reusing an x-request-id never merges two real requests.

alter table public.usage_metrics
  add column if not exists grpc_status smallint check (grpc_status between 0 and 16);

comment on column public.usage_metrics.grpc_status is
  'gRPC status code of the reply (grpc-status trailer or header); null when the reply had none.';
comment on column public.usage_metrics.status_code is
  'HTTP status Envoy sent downstream; 0 when the client went away before a response.';
comment on column public.usage_metrics.response_time_ms is
  'Milliseconds from the first request byte to the last response byte at Envoy, rounded up.';
comment on column public.usage_metrics.occurred_at is
  'When Envoy received the first byte of the request.';

create unique index if not exists usage_metrics_request_id_occurred_at_key
  on public.usage_metrics (request_id, occurred_at)
  where request_id is not null;
