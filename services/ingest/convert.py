"""Conversions between ingest protos and domain values, as paired `x_from_proto` / `x_to_proto` functions.

Empty until the ingest RPCs are built: the servicer has no domain call to convert for yet.
"""
