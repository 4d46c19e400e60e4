"""KV cache beyond one worker: block hashing shared by engine, frontend and router; tiers; transfer."""
