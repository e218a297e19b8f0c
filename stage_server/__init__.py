"""Stage server: serves a contiguous range of transformer layers over gRPC."""
