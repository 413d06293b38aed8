"""one2one server: gRPC transport and operations around the ranking core."""
