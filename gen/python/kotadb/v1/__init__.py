"""Generated code: do not edit (scripts/gen_protos.py)."""
# generated with: grpcio-tools 1.81.1, mypy-protobuf 5.1.0
