# The two commands of the README. Each creates .venv and installs the pinned
# set (constraints.txt, which takes constraints/shared.txt in) when it is missing
# or older than any dependency file.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo
PYTEST_ARGS ?=
# Everything; the gpu extra (TensorRT) only where CUDA is (nvidia-smi answers).
EXTRAS ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo all,test; else echo export,test; fi)

.PHONY: demo test install bench clean

DEPENDENCY_FILES := pyproject.toml constraints.txt $(wildcard constraints/*.txt)

$(STAMP): $(DEPENDENCY_FILES)
	@case "$(EXTRAS)" in *all*) ;; *) echo "no CUDA here (nvidia-smi): installing without the gpu extra (TensorRT)";; esac
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/patchserve demo --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/patchserve bench all --quick --out bench-results --update-results

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
