"""one2one ranking core: bundle format, features, scoring kernels and the personalization ladder."""
