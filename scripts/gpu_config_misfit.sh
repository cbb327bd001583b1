#!/usr/bin/env bash
# GPU demonstration of a user serving config too small for a case (issue 11): DeepSpeed's default
# max_tokens of 1024 given explicitly, a prompt of 1536 tokens plus 32 new ones. The case is run as
# deployed (never enlarged) and its verdict carries the reason. Run from the repository root on a CUDA
# machine with the plugin installed; writes the report to ${OUT:-.}/config-misfit.
set -euo pipefail
out="${OUT:-.}/config-misfit"
mkdir -p "$out"
echo '{"max_tokens": 1024}' > "$out/ds.json"
echo "{\"id\": \"long-1536\", \"input_ids\": $(python3 -c 'print([(i * 7919) % 50000 + 10 for i in range(1536)])')}" \
  > "$out/prompts.jsonl"
python3 -m pytest --pyargs pytest_neoxmii.suite.test_parity --neox-model="${MODEL:-pythia-160m}" \
  --neox-weights=synthetic --neox-backends=ds --neox-ds-config="$out/ds.json" --neox-prompts="$out/prompts.jsonl" \
  -k "prompt-long-1536" --neox-report="$out" -p no:cacheprovider -rA 2>&1 | tee "$out/pytest.log" || true
grep -n "NOTE: the ds config does not fit" "$out/pytest.log"
