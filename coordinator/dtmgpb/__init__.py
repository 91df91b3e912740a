"""Generated from proto/dtmgimp.proto by `python -m coordinator.grpc_gen`; do not edit."""
