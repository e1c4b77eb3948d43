"""preproc_service's HTTP door (--http-port): OpenAI-compatible routes, MLflow's scoring protocol and
every unary RPC as JSON, each calling the same servicer methods as gRPC (see app.py)."""
