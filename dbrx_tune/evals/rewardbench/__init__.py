"""RewardBench (v1, v2, DPO-as-RM) for reward models trained with this toolkit: data, scoring, sections, the
leaderboard files, and the command line (`python -m dbrx_tune.evals.rewardbench` or `dbrx-rewardbench`)."""
