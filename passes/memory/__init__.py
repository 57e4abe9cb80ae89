"""Memory: arena planning, and what onnxruntime really holds (the cost model the passes read)."""
