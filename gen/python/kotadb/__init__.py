"""Generated code: do not edit (scripts/gen_protos.py)."""
