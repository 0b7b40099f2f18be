# witforge — every target creates or reuses .venv by itself.
#   make demo                 the whole demo build end to end (local demo web of real images)
#   make test                 the test suite (what CI runs)
#   make <stage> BUILD=manifests/<name>.yaml   one stage of a build
#   make status  BUILD=manifests/<name>.yaml   which stages would run next, and why
#   make experiment           raw vs curated vs every ablation, 3 seeds (runs/demo/compare/)
#   make card    BUILD=manifests/<name>.yaml   the build's HTML data card (runs/<name>/card/)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
WF     := $(VENV)/bin/witforge
BUILD  ?= manifests/demo.yaml
STAMP  := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export HF_HUB_OFFLINE := 1

STAGES := ingest text_filter url_dedup precrawl_balance robots crawl image_filter image_dedup \
          decontaminate embed clip_filter semantic_dedup balance shard

.PHONY: help venv demo demo-data experiment test test-slow bench lint lock audit status run train evaluate card clean $(STAGES)

help:
	@sed -n '1,7p' Makefile | sed 's/^# \{0,1\}//'
	@echo "stage targets: $(STAGES) run status train evaluate audit card; bench lint clean"

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	@touch $@

venv: $(STAMP)

demo-data: $(STAMP)
	$(WF) demo-data

demo: $(STAMP)
	$(WF) demo --build $(BUILD)

# The seeded comparison: the demo build's data stages (no training), then every arm x seed.
experiment: $(STAMP)
	$(WF) demo --build $(BUILD) --no-train
	$(WF) compare --build $(BUILD) --seeds 3 --ablate all

# the page tests drive Debian's chromium + chromium-driver: installed here when missing (as root)
test: $(STAMP)
	$(PY) -c "from pages.browser import ensure_chromium; ensure_chromium()"
	$(PY) -m pytest -q -m "not slow" --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

$(STAGES): $(STAMP)
	$(WF) $@ --build $(BUILD) $(ARGS)

run status audit train evaluate card: $(STAMP)
	$(WF) $@ --build $(BUILD) $(ARGS)

plan: $(STAMP)
	$(WF) plan --build $(BUILD) $(ARGS)

# constraints.txt pins every package of .venv: after editing requirements.txt, regenerate it
# from a fresh venv (so nothing installed by hand slips in).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -r requirements.txt
	.venv-lock/bin/python -m pip check
	( sed -n '1,3p' constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable \
	  | grep -v '^witforge' ) > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf runs bench/results/*.tmp .pytest_cache
