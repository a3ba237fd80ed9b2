from dbrx_tune.evals.rewardbench.cli import main

raise SystemExit(main())
