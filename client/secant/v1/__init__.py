"""Generated gRPC stubs for secant.v1 (scripts/gen_protos.py; do not edit)."""
