"""The stage life cycle (`stage`: parse, check, build, train, save), the DBRX trainers, online RL and PPO."""
