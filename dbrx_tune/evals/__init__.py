"""Evaluations: RewardBench scoring and its leaderboard files (`rewardbench`), vibe checks and their report
(`vibes`)."""
