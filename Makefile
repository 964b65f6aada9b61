# The README's two commands: `make demo` (the main job on the embedded default) and `make test`.
# Both create the virtualenv and install everything they need themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The security scanners the tests run (checkov, hadolint), in a virtualenv of their own.
TOOLS_VENV ?= .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed-stamp
# The supported versions, tested (README, "Supported versions"): `make test-lowest` runs the lowest versions
# pyproject.toml allows on the lowest Python it claims, `make test-newest-python` today's releases on the
# newest. PyPI has no CPU-only torch for these Pythons (only CUDA builds: about 2.7 GB of wheels), so both
# run the Airflow-side tests; the trainer's run on Python 3.11 in `make test` and `make test-lowest-trainer`.
PYTHON_LOWEST ?= $(HOME)/.pyenv/versions/3.10.13/bin/python
PYTHON_NEWEST ?= $(HOME)/.pyenv/versions/3.12.1/bin/python
PYTHON_TRAINER ?= $(HOME)/.pyenv/versions/3.11.7/bin/python
LOWEST_VENV ?= .venv-lowest
LOWEST_TRAINER_VENV ?= .venv-lowest-trainer
NEWEST_VENV ?= .venv-newest-python
# The tests that train with torch; everything else in tests/unit and tests/dags runs without it.
AIRFLOW_SIDE_TESTS := tests/unit tests/dags --ignore=tests/unit/gpu_trainer --ignore=tests/dags/test_custom_trainer.py \
	--ignore=tests/dags/test_pipeline_topology.py --ignore=tests/dags/test_pipeline_s3_connection.py \
	--ignore=tests/dags/test_local_preemption.py \
	--ignore=tests/dags/test_distributed_local.py --ignore=tests/dags/test_distributed_example_local.py \
	--deselect tests/dags/test_example_dags.py::test_pipeline_end_to_end_registers_a_champion_then_skips_an_unreachable_gate \
	--deselect tests/dags/test_example_dags.py::test_sweep_dag_runs_one_mlflow_run_per_combination_and_picks_the_best

.PHONY: install tools demo test test-lowest test-lowest-trainer test-newest-python lint typecheck unit bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,trainer]"
	touch $(STAMP)

install: $(STAMP)

$(TOOLS_STAMP): requirements-tools.txt
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_VENV)/bin/python -m pip install --quiet -r requirements-tools.txt
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)

demo: install
	$(BIN)/python scripts/demo.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest tests/unit

test: lint typecheck tools
	$(BIN)/python -m pytest tests

# A fresh virtualenv each time the bounds change: leftovers from an earlier resolution would hide a bad bound.
$(LOWEST_VENV)/.installed-stamp: pyproject.toml scripts/lowest_constraints.py constraints-lowest-transitive.txt
	rm -rf $(LOWEST_VENV)
	$(PYTHON_LOWEST) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet --upgrade pip tomli
	$(LOWEST_VENV)/bin/python scripts/lowest_constraints.py --extra dev > $(LOWEST_VENV)/lower-bounds.txt
	$(LOWEST_VENV)/bin/python -m pip install --quiet -c $(LOWEST_VENV)/lower-bounds.txt \
		-c constraints-lowest-transitive.txt -e ".[dev]"
	touch $@

test-lowest: $(LOWEST_VENV)/.installed-stamp
	$(LOWEST_VENV)/bin/python -m pytest $(AIRFLOW_SIDE_TESTS)

# The trainer extra alone at its lower bounds, without Airflow, the way the trainer image installs it.
$(LOWEST_TRAINER_VENV)/.installed-stamp: pyproject.toml constraints.txt scripts/lowest_constraints.py
	rm -rf $(LOWEST_TRAINER_VENV)
	$(PYTHON_TRAINER) -m venv $(LOWEST_TRAINER_VENV)
	$(LOWEST_TRAINER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST_TRAINER_VENV)/bin/python scripts/lowest_constraints.py --no-core --extra trainer \
		> $(LOWEST_TRAINER_VENV)/requirements-lowest.txt
	$(LOWEST_TRAINER_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(LOWEST_TRAINER_VENV)/bin/python -m pip install --quiet -c constraints.txt \
		-r $(LOWEST_TRAINER_VENV)/requirements-lowest.txt pytest pytest-timeout requests pyyaml
	touch $@

test-lowest-trainer: $(LOWEST_TRAINER_VENV)/.installed-stamp
	$(LOWEST_TRAINER_VENV)/bin/python -m pytest tests/unit/gpu_trainer \
		--ignore=tests/unit/gpu_trainer/test_contract_facts.py

$(NEWEST_VENV)/.installed-stamp: pyproject.toml constraints.txt
	test -x $(NEWEST_VENV)/bin/python || $(PYTHON_NEWEST) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade -c constraints.txt -e ".[dev]"
	touch $@

test-newest-python: $(NEWEST_VENV)/.installed-stamp
	$(NEWEST_VENV)/bin/python -m pytest $(AIRFLOW_SIDE_TESTS)

bench: install
	for script in tests/benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(LOWEST_VENV) $(LOWEST_TRAINER_VENV) $(NEWEST_VENV) .demo .pytest_cache .mypy_cache .ruff_cache
