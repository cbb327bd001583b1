# Sourced by the GPU scripts (`source scripts/device-install.sh || exit 1`): the wheels of .whl/ into
# /tmp/site (the lent machines have no package registry), then compiled to bytecode once, as pip does on a
# normal install. Installed with --no-compile and nothing cached, every process of a session (the test
# process and each worker) compiled transformers' and DeepSpeed's sources at every import: 8.8 s of a warm
# session's 97.5 s in the test process alone (cProfile, one H200, pythia-160m synthetic).
if [ ! -f /tmp/site/.neoxmii-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || return 1
  python3 -m compileall -q -j 0 /tmp/site > /dev/null 2>&1
  touch /tmp/site/.neoxmii-installed
fi
unset PYTHONDONTWRITEBYTECODE
