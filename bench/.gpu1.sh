S=$(mktemp -d); python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" .whl/*.whl && export PYTHONPATH="$S:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv
R=recipes/dbrx_sft_qlora_32k.yaml
timeout 170 python3 bench/qlora_132b.py --recipe $R --steps 2 --output $OUT/qlora_132b_32k_recipe.json 2>&1 | grep -v Warning | tail -6
timeout 170 python3 bench/qlora_132b.py --recipe $R --optim adamw_8bit --steps 2 --output $OUT/qlora_132b_32k_recipe_8bit.json 2>&1 | grep -v Warning | tail -6
timeout 170 python3 bench/qlora_132b.py --recipe $R --optim adamw_8bit --moe-token-chunk 1024 --experts-per-group 2 --steps 2 --output $OUT/qlora_132b_32k_recipe_8bit_c1024.json 2>&1 | grep -v Warning | tail -6
