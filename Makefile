# Two commands for a newcomer: `make demo` and `make test`. Everything else here serves them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch's CPU build, pinned: the tests need no GPU, and without the pin pip may fetch a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: venv venv-test demo test lint typecheck unit docs lightning-lower-bound mutate mutate-full clean

venv: $(VENV)/.core-installed

venv-test: $(VENV)/.test-installed

# Each stamp depends on pyproject.toml, so `make venv` is a no-op until the dependencies change.
$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.core-installed: pyproject.toml $(VENV)/.created
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.created
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[dev,lightning,tinker,otel,docs]"
	touch $@ $(VENV)/.core-installed

demo: venv
	$(BIN)/python examples/recovery_simulated.py

lint: venv-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check tinkex_recovery integrations

typecheck: venv-test
	$(BIN)/mypy tinkex_recovery integrations

# pytest exits 5 when it collected nothing: that is a broken suite, never a pass.
unit: venv-test
	@$(BIN)/pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The documentation site, built offline into site/; --strict turns every warning (a broken link, a reference
# mkdocstrings cannot resolve, a missing snippet file) into a failure. (Not --quiet: it hides the warnings
# --strict counts, and the build passes.)
docs: venv-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: lint typecheck unit docs

# The Lightning tests on the lowest Lightning pyproject.toml allows (the venv has the highest): it lies beside the
# venv's packages (--no-deps: the venv provides torch and the rest) and comes first on PYTHONPATH.
LIGHTNING_LOW := 2.4.0
lightning-lower-bound: venv-test
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target .lightning-$(LIGHTNING_LOW) \
		"lightning==$(LIGHTNING_LOW)"
	PYTHONPATH=.lightning-$(LIGHTNING_LOW) $(BIN)/pytest tests/test_lightning.py tests/test_lightning_edges.py -q

# Mutation testing, for contributors (docs/mutation.md); too slow for `make test` and CI. `make mutate` tests only
# the mutants of functions changed since the last run (and re-tests the survivors); `make mutate-full` all of them.
# MUTANTS='tinkex_recovery._retry.*' narrows a run to some mutants (each one re-tested); MUTATE_JOBS: at once.
MUTATE_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
MUTANTS ?=

$(VENV)/.mutate-installed: pyproject.toml $(VENV)/.test-installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[mutate]"
	touch $@

mutate: venv-test $(VENV)/.mutate-installed
	$(BIN)/python tools/mutate.py --jobs $(MUTATE_JOBS) $(MUTANTS)

mutate-full: venv-test $(VENV)/.mutate-installed
	$(BIN)/python tools/mutate.py --full --jobs $(MUTATE_JOBS) $(MUTANTS)

clean:
	rm -rf $(VENV) .lightning-* build dist site *.egg-info .mutate
