-- public.find_api_key(hash) was written for auth's Check before the key cache existed. Check now
-- reads keys through services/auth/store.py (the key cache's loader and its LISTEN/NOTIFY
-- eviction), and nothing calls the function any more. A security-definer function that nobody
-- uses is surface without a purpose, so it goes.
drop function if exists public.find_api_key(text);
