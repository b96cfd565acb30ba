# The README's commands. Each target installs what it needs into .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On CPU, a training step allocates and frees its largest tensors (the logits: batch x sequence x 50K) anew; glibc
# maps them fresh each time and the kernel zeroes them 4 KiB at a time. Asking for transparent huge pages there cuts
# those page faults ~45x and a CPU run's time ~15% (README, Performance). glibc reads this once, as a process starts.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: install demo test check clean

# The exported model, loaded and sampled by transformers alone.
define GENERATE
import sys, torch
from transformers import AutoTokenizer, GPTNeoXForCausalLM
tok, model = AutoTokenizer.from_pretrained(sys.argv[1]), GPTNeoXForCausalLM.from_pretrained(sys.argv[1])
ids = tok("The", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
print("transformers generates:", repr(tok.decode(out[0])))
endef
export GENERATE

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build on this machine's disk, not a multi-GB CUDA build
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q --no-compile -e '.[dev]'
	# the bytecode pip compiles one file at a time, on every core (a file only newer Pythons parse fails: no matter)
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
		> /dev/null || true
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the bundled sample, on CPU.
demo: $(STAMP)
	$(BIN)/neox-data train-tokenizer pile_tools/sample --output demo-output/tokenizer --vocab-size 16384
	$(BIN)/neox-data compare-tokenizers pile_tools/sample --tokenizer demo-output/tokenizer --tokenizer gpt-neox-20b \
		--output demo-output/compare
	$(BIN)/neox-data build-shards pile_tools/sample --tokenizer gpt-neox-20b \
		--output demo-output/shards --split 90,5,5 --weights pile
	$(BIN)/neox-data inspect demo-output/shards --decode 1 --chars 120
	rm -rf demo-output/run
	$(BIN)/neox-data train --config configs/tiny.yml --data demo-output/shards --save demo-output/run
	$(BIN)/neox-data export-hf demo-output/run --output demo-output/hf
	$(BIN)/python -c "$$GENERATE" demo-output/hf
	$(BIN)/neox-data evaluate demo-output/run --output demo-output/eval.json
	@echo "loss curve: demo-output/run/loss.png; metrics: demo-output/run/metrics.jsonl"

# Two workers, a test file each at a time, handed out in the order tests/conftest.py gives; also executes notebooks/.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

check: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-output
