# Two commands do all set-up: `make demo` and `make test`. Both bootstrap .venv.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-slow lint-imports bench clean

venv:
	@bash scripts/bootstrap.sh

demo: venv
	$(PY) -m semedge.cli demo

test: venv
	$(PY) -m pytest -q -x --timeout=900

# The import contracts alone (also run by `make test`: tests/test_imports.py).
lint-imports: venv
	$(PY) scripts/lint_imports.py

test-slow:
	@SEMEDGE_SLOW=1 bash scripts/bootstrap.sh
	$(PY) -m pytest -q -m slow --timeout=3600

bench: venv
	$(PY) benchmarks/latency.py --quick

clean:
	rm -rf build dist .pytest_cache
