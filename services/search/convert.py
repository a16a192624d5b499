"""Conversions between search protos and domain values, as paired `x_from_proto` / `x_to_proto` functions.

Empty until the search RPCs are built: the servicer has no domain call to convert for yet.
"""
