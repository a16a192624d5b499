-- Neutral demo data for local development. Idempotent: running it again changes nothing (and,
-- because nothing is updated, takes no new document revisions).
--
-- The demo user has a fixed id so scripts and docs can refer to it.

insert into auth.users (id, aud, role, email)
values ('00000000-0000-4000-8000-00000000d3e0', 'authenticated', 'authenticated', 'demo@kotadb.local')
on conflict (id) do nothing;

insert into public.documents (user_id, repository_id, path, language, content, metadata)
values
  (
    '00000000-0000-4000-8000-00000000d3e0',
    null,
    'examples/greeting.py',
    'python',
    E'"""Greeting helpers for the KotaDB demo."""\n\n\ndef greet(name: str) -> str:\n    """greet returns a friendly greeting for name."""\n    return f"Hello, {name}!"\n\n\nclass Greeter:\n    """Greeter remembers a name and greets it."""\n\n    def __init__(self, name: str) -> None:\n        self.name = name\n\n    def greet(self) -> str:\n        return greet(self.name)\n',
    '{"source": "seed"}'::jsonb
  ),
  (
    '00000000-0000-4000-8000-00000000d3e0',
    null,
    'examples/fib.go',
    'go',
    E'package examples\n\n// Fib returns the n-th Fibonacci number.\nfunc Fib(n int) int {\n\ta, b := 0, 1\n\tfor i := 0; i < n; i++ {\n\t\ta, b = b, a+b\n\t}\n\treturn a\n}\n',
    '{"source": "seed"}'::jsonb
  )
on conflict on constraint documents_user_id_repository_id_path_key do nothing;
