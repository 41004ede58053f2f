"""What both servers (Triton and vLLM) use: local ports and HTTP probes, process groups, detached-server records,
bundle file placement."""
