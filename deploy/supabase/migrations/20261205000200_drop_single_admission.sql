-- The auth service admits requests from leased blocks (20261205000100_admission_leases.sql) and no
-- longer calls the one-request-at-a-time admission function; drop it so nothing can count usage
-- by a path that knows nothing of leases.
drop function if exists public.admit_api_key_requests(uuid, integer, timestamptz, date, timestamptz);
